"""Prefect task: train the embedded tiny CLIP and register it as version 1, alias ``champion``."""

from __future__ import annotations

from pathlib import Path

import mlflow
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks import registry
from tasks.champion import lineage_tags
from tasks.report import confusion_plot, history_plot, image_grid, per_class_plot
from tasks.settings import ErasureSettings
from unlearning.bootstrap import bootstrap_world_model
from unlearning.models import count_parameters, pick_device
from unlearning.oracle import TrainingRecipe
from unlearning.precision import resolve_precision
from unlearning.train import TrainConfig
from unlearning.world import WorldSpec


@task(name="bootstrap-champion", cache_policy=NO_CACHE)
def bootstrap_champion(settings: ErasureSettings, spec: WorldSpec, config: TrainConfig, model_name: str = "TinyCLIP-RN32") -> dict:
    """Generate the world, train, evaluate, log everything to one MLflow run and register v1 as champion."""
    logger = get_run_logger()
    precision = resolve_precision(config.precision, pick_device(settings.device), stage="train")
    logger.info("training in %s (%s)", precision.dtype, precision.reason)
    with mlflow.start_run(run_name="bootstrap", tags={"erasure.kind": "bootstrap"}) as run:
        mlflow.log_params({"architecture": model_name, **{f"world.{k}": v for k, v in spec.__dict__.items()},
                           **{f"train.{k}": v for k, v in config.model_dump().items()},
                           "precision": precision.dtype, "precision.reason": precision.reason})

        def on_log(step: int, row: dict) -> None:
            mlflow.log_metrics({k: v for k, v in row.items() if k != "step"}, step=step)

        result = bootstrap_world_model(Path(settings.world_dir), spec, model_name, config, settings.device, on_log=on_log)
        metrics = result.evaluation.metrics
        shape_accuracy = result.evaluation.confusions["class"].accuracy
        mlflow.log_metrics({"shape_accuracy": shape_accuracy, **{k.replace("@", "_at_"): v for k, v in metrics.items()},
                            **{f"seconds.{k}": v for k, v in result.seconds.items()},
                            "parameters": count_parameters(result.bundle.model)})
        mlflow.log_dict({"per_class": result.evaluation.per_class, "metrics": metrics}, "evaluation.json")
        mlflow.log_image(image_grid(result.sample_images), "samples/test_images.png")
        mlflow.log_figure(per_class_plot(result.evaluation.per_class, result.evaluation.per_class, [], "bootstrap: zero-shot accuracy per class"),
                          "plots/per_class.png")
        class_result = result.evaluation.confusions["class"]
        mlflow.log_figure(confusion_plot(class_result.confusion, class_result.classnames, "bootstrap: shape confusion"), "plots/confusion.png")
        mlflow.log_figure(history_plot(result.history, ["loss"], "bootstrap training loss"), "plots/training_loss.png")
        tags = {**lineage_tags([], [], None), "status": "champion", "erasure.method": "bootstrap", "erasure.world_seed": str(spec.seed)}
        recipe = TrainingRecipe(model_name=model_name, train=config, image_size=spec.image_size)  # its oracles are trained with it
        version = registry.register_bundle(result.bundle, settings, tags, run.info.run_id, recipe)
        registry.set_alias(settings.model_name, "champion", str(version.version))
        logger.info("bootstrapped %s v%s: shape %.1f %%, colour %.1f %%", settings.model_name, version.version,
                    100 * shape_accuracy, 100 * metrics.get("heldout/colour", float("nan")))
        return {"version": str(version.version), "shape_accuracy": shape_accuracy, "metrics": metrics, "precision": precision.model_dump(),
                "per_class": result.evaluation.per_class, "seconds": result.seconds, "run_id": run.info.run_id}
