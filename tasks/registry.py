"""MLflow model registry: log open_clip folders as pyfunc versions and move the aliases.

Two aliases tell the whole story: ``champion`` is what serves, ``previous`` is what it replaced
(the one-step rollback target). Nothing here decides *whether* to promote; flows do.

A registered version is a pyfunc whose single artifact is the open_clip model folder
(``open_clip_config.json`` + safetensors), so ``mlflow.pyfunc.load_model('models:/NAME@champion')``
serves embeddings and zero-shot predictions, and :func:`download_version` hands the plain folder
back to ``unlearning.models.load_model``. Neither the model nor the wrapper is ever pickled: the
wrapper is logged as "models from code".
"""

from __future__ import annotations

import base64
import io
import os
import tempfile
import warnings
from contextlib import nullcontext
from datetime import datetime, timezone
from importlib.metadata import version as installed_version
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, RESOURCE_DOES_NOT_EXIST, ErrorCode
from mlflow.tracking import MlflowClient
from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema

from tasks.settings import ErasureSettings, get_settings, quiet_telemetry

CHAMPION, PREVIOUS = "champion", "previous"
# Events recorded on a version as tags where they happen; its `status` tag is derived from them.
PROMOTED_AT, ROLLED_BACK_AT, PROMOTION_UNDONE_AT = "erasure.promoted_at", "erasure.rolled_back_at", "erasure.promotion_undone_at"
PURGED_AT, PURGED_REASON, PURGED_FILES, PURGED_WINDOW_DAYS = (
    "erasure.purged_at", "erasure.purged_reason", "erasure.purged_files", "erasure.purged_window_days")
DECISION = "erasure.decision"  # set by the erasure flow: "rejected", "promoted" or "candidate"
STATUSES = ("champion", "previous", "purged", "rolled_back", "superseded", "rejected", "undone", "candidate")
ARTIFACT = "open_clip_model"
DEFAULT_TEMPLATE = "a photo of a {}."

# Rows carry either a caption or an image (PNG/JPEG bytes, or base64 text); classnames turn
# image rows into zero-shot predictions.
SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec(DataType.string, "text", required=False), ColSpec(DataType.binary, "image", required=False)]),
    params=ParamSchema([
        ParamSpec("classnames", DataType.string, [], shape=(-1,)),
        ParamSpec("template", DataType.string, DEFAULT_TEMPLATE),
    ]),
)
# Pinned to what logged the model, so a serving environment rebuilds the same stack. The
# clip-erasure package itself (tasks/, unlearning/) must be installed there too.
_PINNED = ("mlflow", "torch", "torchvision", "open_clip_torch", "safetensors", "pandas", "pillow", "numpy", "pydantic-settings")
# "Models from code": MLflow stores and later runs this file instead of unpickling an object.
_MODEL_CODE = "import mlflow\nfrom tasks.registry import ClipPyfunc\n\nmlflow.models.set_model(ClipPyfunc())\n"


class ClipPyfunc(mlflow.pyfunc.PythonModel):
    """Serves a CLIP from its open_clip folder: text/image embeddings and zero-shot labels."""

    def load_context(self, context) -> None:
        from unlearning.models import LOCAL_DIR, load_model

        self.bundle = load_model(LOCAL_DIR + context.artifacts[ARTIFACT], device=get_settings().device)

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        """One output row per input row.

        Args:
            model_input: rows with exactly one of ``text`` (a caption) or ``image`` (encoded
                image bytes, or the same as base64 text).
            params: ``classnames`` (list) and ``template`` (``"a photo of a {}."``) add zero-shot
                ``label`` and ``probabilities`` (class → probability) to image rows.

        Returns:
            ``embedding`` (L2-normalised list of floats) per row, plus ``label`` and
            ``probabilities`` when ``classnames`` are given (``None`` on text rows).
        """
        # torch and the library load with the model, not with the registry: flows that only move
        # aliases stay light.
        import numpy as np
        import torch

        from unlearning.data import load_image
        from unlearning.metrics import encode_images, encode_texts, zero_shot_classifier

        params = params or {}
        model, tokenizer = self.bundle.model, self.bundle.tokenizer
        texts = _column(model_input, "text")
        images = _column(model_input, "image")
        if any((t is None) == (i is None) for t, i in zip(texts, images)):
            raise ValueError("each row needs exactly one of the columns 'text' or 'image'")
        text_rows = [n for n, t in enumerate(texts) if t is not None]
        image_rows = [n for n, i in enumerate(images) if i is not None]

        embeddings = torch.zeros(len(model_input), self.bundle.model_cfg["embed_dim"])
        if text_rows:
            embeddings[text_rows] = encode_texts(model, tokenizer, [texts[n] for n in text_rows]).cpu()
        if image_rows:
            pixels = [load_image(io.BytesIO(_image_bytes(images[n])), self.bundle.image_size) for n in image_rows]
            batch = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).contiguous()
            embeddings[image_rows] = encode_images(model, batch).cpu()
        output = pd.DataFrame({"embedding": embeddings.tolist()}, index=model_input.index)

        classnames = list(params.get("classnames") or [])
        if classnames:
            template = params.get("template") or DEFAULT_TEMPLATE
            classifier = zero_shot_classifier(model, tokenizer, classnames, [template]).cpu()
            with torch.no_grad():
                probs = (model.logit_scale.exp().cpu() * embeddings @ classifier).softmax(dim=-1)
            labels, probabilities = [None] * len(output), [None] * len(output)
            for n in image_rows:
                labels[n] = classnames[int(probs[n].argmax())]
                probabilities[n] = dict(zip(classnames, probs[n].tolist()))
            output["label"], output["probabilities"] = labels, probabilities
        return output


def configure_mlflow(settings: ErasureSettings | None = None) -> str:
    """Point MLflow at the configured tracking store and experiment; create them if needed.

    Args:
        settings: tracking URI, experiment name and artifact location; defaults to
            :func:`get_settings`.

    Returns:
        The experiment id.
    """
    settings = settings or get_settings()
    quiet_telemetry()
    if settings.tracking_uri.startswith("sqlite:///"):
        Path(settings.tracking_uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    if settings.s3_endpoint_url and str(settings.artifact_location).startswith("s3://"):
        # MLflow's own S3 client reads the endpoint from here, not from our settings.
        os.environ.setdefault("MLFLOW_S3_ENDPOINT_URL", settings.s3_endpoint_url)
    mlflow.set_tracking_uri(settings.tracking_uri)
    experiment = mlflow.get_experiment_by_name(settings.experiment)
    # Without an explicit location a sqlite store writes artifacts to ./mlruns of the cwd.
    experiment_id = (
        experiment.experiment_id
        if experiment
        else mlflow.create_experiment(settings.experiment, artifact_location=settings.artifact_location)
    )
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def register_bundle(bundle, settings: ErasureSettings | None, tags: dict, run_id: str | None = None, recipe=None) -> ModelVersion:
    """Save a loaded model (an ``unlearning.models.ClipBundle``), with its training recipe when
    known, and register it as :func:`register_model_folder` does; the saved folder goes once logged."""
    from unlearning.models import save_model
    from unlearning.oracle import write_recipe

    with tempfile.TemporaryDirectory(prefix="register-") as scratch:
        folder = save_model(bundle, Path(scratch))
        if recipe is not None:
            write_recipe(folder, recipe)
        return register_model_folder(folder, settings, tags, run_id)


def register_model_folder(folder: str | Path, settings: ErasureSettings | None, tags: dict, run_id: str | None = None) -> ModelVersion:
    """Log an open_clip model folder as a pyfunc and register it as a new version.

    Args:
        folder: a folder written by ``unlearning.models.save_model``.
        settings: tracking store and registered model name; defaults to :func:`get_settings`.
        tags: set on the new version (values become strings); never put secrets here.
        run_id: MLflow run to log the model under (e.g. the erasure run); none: no run.

    Returns:
        The new version, with its tags.
    """
    from unlearning.models import CONFIG_FILE, WEIGHTS_FILE

    settings = settings or get_settings()
    configure_mlflow(settings)
    folder = Path(folder)
    if not (folder / CONFIG_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"{folder} is not a saved model folder (save it with unlearning.models.save_model)")
    active = mlflow.active_run()
    run = nullcontext() if run_id is None or (active and active.info.run_id == run_id) else mlflow.start_run(run_id=run_id)
    with tempfile.TemporaryDirectory() as tmp, run, warnings.catch_warnings():
        # The signature is explicit; an input example would only make MLflow load the model here.
        warnings.filterwarnings("ignore", message=".*An input example was not provided")
        code = Path(tmp, "clip_pyfunc.py")
        code.write_text(_MODEL_CODE)
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(code),
            artifacts={ARTIFACT: str(folder)},
            signature=SIGNATURE,
            pip_requirements=[f"{package}=={installed_version(package)}" for package in _PINNED],
            registered_model_name=settings.model_name,
        )
    number = info.registered_model_version
    tag_version(settings.model_name, number, **tags)
    return MlflowClient().get_model_version(settings.model_name, str(number))


def get_version_by_alias(name: str, alias: str) -> ModelVersion | None:
    """The version ``alias`` points at, or ``None`` when the alias (or the model) does not exist.

    Args:
        name: registered model name.
        alias: e.g. ``"champion"``.
    """
    try:
        return MlflowClient().get_model_version_by_alias(name, alias)
    except MlflowException as error:
        # An unknown model is RESOURCE_DOES_NOT_EXIST; an unknown alias, INVALID_PARAMETER_VALUE.
        if error.error_code in (ErrorCode.Name(RESOURCE_DOES_NOT_EXIST), ErrorCode.Name(INVALID_PARAMETER_VALUE)):
            return None
        raise


def set_alias(name: str, alias: str, version: str | int) -> None:
    """Point ``alias`` at ``version`` (moving it if it pointed elsewhere).

    Args:
        name: registered model name.
        alias: alias to set.
        version: version number.
    """
    MlflowClient().set_registered_model_alias(name, alias, str(version))


def tag_version(name: str, version: str | int, **tags) -> None:
    """Set tags on one version; values are stored as strings.

    Args:
        name: registered model name.
        version: version number.
        tags: tag names and values.
    """
    client = MlflowClient()
    for key, value in tags.items():
        client.set_model_version_tag(name, str(version), key, str(value))


def promote(name: str, version: str | int) -> tuple[ModelVersion, ModelVersion | None]:
    """Make ``version`` the champion and the old champion ``previous``.

    Records ``erasure.promoted_at`` on ``version`` and re-derives every version's ``status`` tag.
    A purged version (no weights left) is refused before any alias moves.

    Args:
        name: registered model name.
        version: version to promote.

    Returns:
        ``(new champion, old champion or None)``.
    """
    refuse_purged(MlflowClient().get_model_version(name, str(version)))
    old = get_version_by_alias(name, CHAMPION)
    set_alias(name, CHAMPION, version)
    tag_version(name, version, **{PROMOTED_AT: now_iso()})
    # str(): the SQLite store returns version numbers as int, the REST store as str.
    if old is not None and str(old.version) != str(version):
        set_alias(name, PREVIOUS, old.version)
    sync_status_tags(name)
    return MlflowClient().get_model_version(name, str(version)), old


def promote_if_parent(name: str, version: str | int, expected_parent: str | int | None) -> tuple[ModelVersion, ModelVersion | None]:
    """:func:`promote`, but only while the champion is still the version the candidate was made from.

    The caller holds the promotion lock, so nothing moves the champion between this check and the
    promotion.

    Args:
        name: registered model name.
        version: candidate to promote.
        expected_parent: the champion version the candidate was made from (None: there was none).

    Returns:
        ``(new champion, old champion or None)``.

    Raises:
        ChampionMoved: the champion is no longer ``expected_parent``.
    """
    current = get_version_by_alias(name, CHAMPION)
    current_version = None if current is None else str(current.version)
    expected = None if expected_parent is None else str(expected_parent)
    if current_version != expected:
        raise ChampionMoved(f"champion of {name!r} is now {_label(current_version)}, the candidate v{version} was made from "
                            f"{_label(expected)}: it must be redone from the new champion")
    return promote(name, version)


def rollback_to(name: str, version: str | int, reason: str) -> tuple[ModelVersion, ModelVersion | None]:
    """Make ``version`` the champion again and mark the champion it replaces as rolled back.

    The replaced champion becomes ``previous`` and gets the tags ``erasure.rolled_back_at`` and
    ``rollback_reason`` (its ``status`` follows from them); no version is deleted. A purged
    version is refused before any alias moves.

    Args:
        name: registered model name.
        version: version to restore, usually the one ``previous`` points at.
        reason: why, kept on the rolled-back version.

    Returns:
        ``(restored champion, rolled-back version or None)``.
    """
    refuse_purged(MlflowClient().get_model_version(name, str(version)))
    current = get_version_by_alias(name, CHAMPION)
    if current is not None and str(current.version) != str(version):
        # Recorded before the aliases move, so the sync inside promote already sees the rollback.
        tag_version(name, current.version, **{ROLLED_BACK_AT: now_iso(), "rollback_reason": reason})
    restored, rolled_back = promote(name, version)
    if rolled_back is not None and str(rolled_back.version) != str(version):
        rolled_back = MlflowClient().get_model_version(name, str(rolled_back.version))
    return restored, rolled_back


class ChampionMoved(LookupError):
    """The champion changed after a candidate was made from it: the candidate must be redone."""


class VersionPurged(LookupError):
    """The version's weights were purged: it can no longer serve or be rolled back to."""


def refuse_purged(version: ModelVersion) -> None:
    """Raise :class:`VersionPurged` when ``version`` was purged (its weights are gone).

    Args:
        version: the version about to be served or rolled back to.
    """
    purged_at = (version.tags or {}).get(PURGED_AT)
    if purged_at is None:
        return
    days = (version.tags or {}).get(PURGED_WINDOW_DAYS)
    window = f"the rollback window of {days} days" if days is not None else "the rollback window"
    raise VersionPurged(f"version {version.version} of {version.name} was purged at {purged_at}, {window} had passed; it holds no "
                        f"weights; re-register a model with `erasure register` to go back")


def derive_status(tags: dict, aliases: list[str]) -> str:
    """A version's ``status``, from its aliases and the events recorded on it as tags.

    An alias says what the version does now; otherwise the latest event says what became of it:
    ``purged`` (weights gone, final), ``rolled_back`` or ``superseded`` (served once, no longer;
    whichever happened last), ``rejected``, ``undone`` (promoted, then put back by a failure),
    else ``candidate``.

    Args:
        tags: the version's tags.
        aliases: the aliases pointing at it.

    Returns:
        One of :data:`STATUSES`.
    """
    if CHAMPION in aliases:
        return "champion"
    # A purged version cannot serve, even with `previous` still pointing at it: a rollback to it is refused.
    if PURGED_AT in tags:
        return "purged"
    if PREVIOUS in aliases:
        return "previous"
    rolled_back_at, promoted_at = tags.get(ROLLED_BACK_AT), tags.get(PROMOTED_AT)
    if rolled_back_at is not None or (promoted_at is None and "rollback_reason" in tags):  # rollback_reason alone: legacy rollback
        # Promoted again after the rollback and then replaced: superseded (ISO times in UTC compare as text).
        return "superseded" if promoted_at is not None and rolled_back_at is not None and promoted_at > rolled_back_at else "rolled_back"
    if promoted_at is not None:
        return "superseded"
    # status=rejected: written by flows before erasure.decision existed.
    if tags.get(DECISION) == "rejected" or tags.get("status") == "rejected":
        return "rejected"
    if PROMOTION_UNDONE_AT in tags:
        return "undone"
    return "candidate"


def sync_status_tags(name: str) -> dict[str, str]:
    """Set every version's ``status`` tag to :func:`derive_status` (only where it differs).

    Args:
        name: registered model name.

    Returns:
        ``{version: status}`` for every version.
    """
    client = MlflowClient()
    by_version: dict[str, list[str]] = {}
    for alias, number in client.get_registered_model(name).aliases.items():
        by_version.setdefault(str(number), []).append(alias)
    statuses = {}
    for version in list_versions(name):
        number = str(version.version)
        statuses[number] = derive_status(version.tags or {}, by_version.get(number, []))
        if (version.tags or {}).get("status") != statuses[number]:
            client.set_model_version_tag(name, number, "status", statuses[number])
    return statuses


def now_iso() -> str:
    """The current UTC time as ISO 8601 text (to the second), as every event tag records it."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _label(version: str | None) -> str:
    return "none" if version is None else f"v{version}"


def list_versions(name: str) -> list[ModelVersion]:
    """All versions of a registered model, newest first.

    Args:
        name: registered model name.
    """
    versions = MlflowClient().search_model_versions(f"name = '{name}'")
    return sorted(versions, key=lambda v: int(v.version), reverse=True)


def download_version(name: str, version_or_alias: str | int, dest: str | Path) -> Path:
    """Download one version's open_clip folder, loadable by ``unlearning.models.load_model``.

    Args:
        name: registered model name.
        version_or_alias: a version number or an alias such as ``"champion"``.
        dest: local folder to download the logged model into.

    Returns:
        The open_clip model folder inside ``dest``.

    Raises:
        FileNotFoundError: the version holds no weights (it was purged).
    """
    ref = str(version_or_alias)
    uri = f"models:/{name}/{ref}" if ref.isdigit() else f"models:/{name}@{ref}"
    local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dest))
    artifacts = Model.load(local).flavors["python_function"]["artifacts"]
    folder = Path(local) / artifacts[ARTIFACT]["path"]
    if not any(folder.glob("*.safetensors")):
        raise FileNotFoundError(f"version {ref} of {name!r} holds no weights (see its {PURGED_AT} tag: purged versions keep only "
                                f"their audit record)")
    return folder


def _column(frame: pd.DataFrame, name: str) -> list:
    if name not in frame.columns:
        return [None] * len(frame)
    return [None if value is None or (pd.api.types.is_scalar(value) and pd.isna(value)) else value for value in frame[name]]


def _image_bytes(value: bytes | str) -> bytes:
    return base64.b64decode(value, validate=True) if isinstance(value, str) else bytes(value)
