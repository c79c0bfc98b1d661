"""The bootstrap flow: make the embedded default champion exist (skipped when one does)."""

from __future__ import annotations

from prefect import flow, get_run_logger

from tasks import registry
from tasks.bootstrap import bootstrap_champion
from tasks.registry import configure_mlflow
from tasks.settings import ErasureSettings, get_settings
from unlearning.train import TrainConfig
from unlearning.world import WorldSpec


@flow(name="bootstrap", log_prints=True)
def bootstrap_flow(settings: ErasureSettings | None = None, spec: WorldSpec | None = None, config: TrainConfig | None = None,
                   force: bool = False) -> dict:
    """Train and register the tiny shapes-world CLIP as the first ``champion`` unless one exists."""
    settings = settings or get_settings()
    configure_mlflow(settings)
    existing = registry.get_version_by_alias(settings.model_name, "champion")
    if existing is not None and not force:
        get_run_logger().info("champion %s v%s exists: bootstrap skipped", settings.model_name, existing.version)
        return {"version": str(existing.version), "skipped": True}
    return bootstrap_champion(settings, spec or WorldSpec(), config or TrainConfig(precision=settings.precision))
