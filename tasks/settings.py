"""Where the pipeline keeps its state and which limits it enforces, read from ``ERASURE_*`` env vars.

Everything has a local default under ``home`` (``./.erasure``), so a fresh checkout runs with no
configuration. Values come from, in order: keyword arguments, ``ERASURE_*`` environment variables,
a ``.env`` file in the working directory, the defaults below.

Secrets are deliberately not settings: S3 credentials come from the standard AWS chain
(``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, ``~/.aws``, instance roles), so a
dumped or logged settings object never carries a key.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from unlearning.heldout import check_suite_reference


class ErasureSettings(BaseSettings):
    """Paths, services and gate defaults of the erasure pipeline.

    ``tracking_uri``, ``artifact_location`` and ``world_dir`` left unset are derived from ``home``:
    ``sqlite:///<home>/mlflow.db``, ``<home>/mlartifacts`` and ``<home>/world``. With an ``http(s)``
    tracking server, an unset ``artifact_location`` stays ``None`` so the server picks (and proxies)
    the artifact store, and ``mlflow_ui_url`` is the server's address.
    """

    model_config = SettingsConfigDict(env_prefix="ERASURE_", env_file=".env", extra="ignore")

    home: Path = Path(".erasure")
    tracking_uri: str | None = None
    artifact_location: str | None = None
    experiment: str = "clip-erasure"
    model_name: str = "shapes-clip"
    world_dir: Path | None = None
    # Retain/held-out reference data; None: the generated world's <world_dir>/manifest.jsonl.
    reference_manifest: Path | None = None
    # Where people browse runs: the tracking server itself, else `make ui`'s address.
    mlflow_ui_url: str | None = None

    # Where manifests and images fetched from S3 go during one update (the update removes them: forget
    # images among them); None: a temporary folder per update.
    fetch_dir: Path | None = None

    s3_endpoint_url: str | None = None
    s3_region: str = "us-east-1"
    # Buckets that manifests may reference; empty means only the manifest's own bucket.
    allowed_buckets: Annotated[list[str], NoDecode] = []

    device: str | None = None
    # auto: bf16 autocast where the device runs it natively (training), fp32 otherwise; see
    # unlearning/precision.py. fp32 / bf16 force one dtype for every stage.
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # unlearning.precision.Requested, without importing torch here

    # Gate defaults: how much the candidate may still know of the forget set, and how much
    # accuracy it may lose elsewhere (absolute drops against the current champion).
    max_forget_accuracy: float = 0.05
    max_retain_drop: float = 0.02
    max_heldout_drop: float = 0.02
    # Each gate above compares with the current champion, so small drops could add up over many
    # erasures: this one bounds the sum over the lineage (None: not gated).
    max_lineage_retain_drop: float | None = 0.05
    # Which held-out suite the held-out gate (and the guard) probes: "auto" (the world's probes on
    # the shapes world, else the retained classes under unseen paraphrase templates), "world",
    # "paraphrase", or a suite .json file (format: unlearning/heldout.py). A request may name its own.
    heldout_suite: str = "auto"
    # Depth evidence (unlearning/depth.py, docs/depth.md): measured for every erasure's
    # certificate; ``oracle_dir`` holds retrain oracles (`erasure oracle`), compared with when one
    # is cached for the champion's recipe and targets. The depth gates are off (None) unless set:
    # the highest relearn accuracy after 10 attack steps, kNN target recall, and distance of the
    # MIA AUC from 0.5 (from the oracle's AUC when one is cached) a candidate may show.
    depth_evidence: bool = True
    oracle_dir: Path | None = None
    max_relearn_accuracy: float | None = None
    max_knn_recall: float | None = None
    max_mia_distance: float | None = None
    # Guard: never promote a model below this retain accuracy, whatever the champion scored.
    min_retain_accuracy: float = 0.85
    # Purge: days after a promotion during which the versions it superseded keep their weights (the
    # rollback window); after it, `erasure purge` deletes them. 0: purge at once.
    rollback_window_days: float = 7

    prefect_api_url: str | None = None

    # Batches: at most this many requests in one run of the batch flow (the most urgent first).
    batch_max_requests: int = 16
    # Targets one method run forgets together; more run in sequence inside the same update. Ten
    # forgot together in one CLIPErase run with its wide-joint settings (docs/benchmarks.md, batches).
    joint_max_targets: int = Field(default=10, ge=1)
    # How long a run waits for another erasure of the same model (or request) before giving up.
    lock_timeout_s: float = 3600.0

    # Deadlines: a request without due_at is due this many days after requested_at (GDPR: one
    # month), and `erasure status` / mark_deadlines flag it "due soon" this many days before.
    deadline_days: float = Field(default=30, gt=0)
    deadline_warning_days: float = Field(default=7, ge=0)
    # Locks keeping two runs of one request apart (tasks/locks.py): "file" (flock under home: one
    # machine), "prefect" (global concurrency limits on the Prefect server), "auto" (prefect when
    # PREFECT_API_URL points at a server, else file).
    locks: Literal["auto", "file", "prefect"] = "auto"
    # A running attempt's lease: unrenewed this long (the process died), it reads as failed.
    lease_seconds: float = Field(default=120, gt=0)

    @property
    def reference_manifest_path(self) -> Path:
        """The reference data's manifest: the configured one, else the generated world's."""
        return Path(self.reference_manifest or self.world_dir / "manifest.jsonl")

    @field_validator("heldout_suite")
    @classmethod
    def _known_suite(cls, value: str) -> str:
        return check_suite_reference(value)

    @field_validator("rollback_window_days")
    @classmethod
    def _window_not_negative(cls, value: float) -> float:
        if not value >= 0:  # also refuses NaN
            raise ValueError(f"rollback_window_days must be >= 0 (got {value}): set ERASURE_ROLLBACK_WINDOW_DAYS to the days "
                             f"superseded versions keep their weights, 0 to purge at once")
        return value

    @field_validator("allowed_buckets", mode="before")
    @classmethod
    def _split_buckets(cls, value):
        # Env vars accept a JSON list or the friendlier "data,models".
        if isinstance(value, str):
            value = json.loads(value) if value.strip().startswith("[") else value.split(",")
        return [bucket.strip() for bucket in value if bucket.strip()]

    @model_validator(mode="after")
    def _derive_paths(self) -> "ErasureSettings":
        self.home = self.home.expanduser().resolve()
        if self.tracking_uri is None:
            self.tracking_uri = f"sqlite:///{self.home / 'mlflow.db'}"
        server = self.tracking_uri.startswith(("http://", "https://"))
        if self.artifact_location is None and not server:
            self.artifact_location = str(self.home / "mlartifacts")
        if self.mlflow_ui_url is None:
            self.mlflow_ui_url = self.tracking_uri.rstrip("/") if server else "http://127.0.0.1:5000"
        if self.world_dir is None:
            self.world_dir = self.home / "world"
        self.world_dir = self.world_dir.expanduser().resolve()
        self.oracle_dir = (self.oracle_dir or self.home / "oracles").expanduser().resolve()
        return self


@lru_cache(maxsize=1)
def get_settings() -> ErasureSettings:
    """The process-wide settings, read once. Tests call ``get_settings.cache_clear()`` after
    changing ``ERASURE_*`` variables."""
    return ErasureSettings()


def quiet_telemetry() -> None:
    """Turn off MLflow, Prefect and Great Expectations usage reporting unless the user chose otherwise.

    The pipeline must run offline; without these, MLflow and Prefect try to reach telemetry hosts.
    """
    for name, value in {
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "true",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "GX_ANALYTICS_ENABLED": "false",
    }.items():
        os.environ.setdefault(name, value)
