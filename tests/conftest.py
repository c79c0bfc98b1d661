"""Shared fixtures: a small shapes world and a tiny CLIP trained on it, built once and cached.

The trained model is cached under ``.erasure/test-cache`` (keyed by the recipe) so that a second
test session, or a helper running a single test file, does not train again.
"""

from __future__ import annotations

import atexit
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
# The depth evidence of every erasure (tasks/depth.py) costs seconds per model; the tests that
# check it switch it on, the orchestration tests do without.
os.environ.setdefault("ERASURE_DEPTH_EVIDENCE", "false")
# Chains of cheap orchestration erasures drift further than real ones; the lineage gate has its own
# test (tests/test_lineage_gate.py), the others run without it.
os.environ.setdefault("ERASURE_MAX_LINEAGE_RETAIN_DROP", "1.0")
# Under pytest-xdist (`make test` runs two workers), each worker and every process it starts
# computes on one thread: two processes with an OpenMP team each on 2 cores spin against each
# other and run many times slower than one thread each. Set before torch is imported.
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if XDIST_WORKER:
    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(variable, "1")
if "PREFECT_HOME" not in os.environ:  # must be set before prefect is imported anywhere
    os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="prefect-home-")
    atexit.register(shutil.rmtree, os.environ["PREFECT_HOME"], ignore_errors=True)

import torch  # noqa: E402

from unlearning.data import load_images, read_manifest  # noqa: E402
from unlearning.models import load_model, save_model  # noqa: E402
from unlearning.precision import resolve_precision  # noqa: E402
from unlearning.train import TrainConfig, train_clip  # noqa: E402
from unlearning.world import WorldSpec, generate_world  # noqa: E402

pytest_plugins = ["services"]

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("ERASURE_TEST_CACHE", REPO / ".erasure" / "test-cache"))

SMALL_WORLD = WorldSpec(n_train=16000, val_per_subgroup=4, test_per_subgroup=8, seed=7)
# ~2 minutes on 2 idle cores; enough for a model that knows its shapes (~75-80 %), so that
# forgetting one and keeping the others is a real test. The seed fixes the initialisation and the
# batches, so a machine trains the same model every time; another CPU type may round differently
# and train a slightly different one, so the method tests must hold for any such model.
# ERASURE_TEST_SEED trains another one to check that they do.
# Precision follows the hardware as the bootstrap's does (bf16 only where native); the resolved
# dtype is part of the cache key, since it changes the trained model.
SMALL_TRAIN = TrainConfig(steps=800, batch_size=128, lr=2e-3, warmup_steps=60, seed=int(os.environ.get("ERASURE_TEST_SEED", "0")),
                          precision=os.environ.get("ERASURE_PRECISION", "auto"))

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]) if XDIST_WORKER else min(2, os.cpu_count() or 1))


def _key(*parts) -> str:
    return hashlib.sha1(json.dumps([p.model_dump() if hasattr(p, "model_dump") else str(p) for p in parts]).encode()).hexdigest()[:12]


def _small_world() -> Path:
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / "world.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return generate_world(CACHE / f"world-{_key(SMALL_WORLD)}", SMALL_WORLD, progress=False)


def _trained_model_dir(world: Path) -> Path:
    folder = CACHE / f"model-{_key(SMALL_WORLD, SMALL_TRAIN, 'seeded-init', resolve_precision(SMALL_TRAIN.precision, 'cpu').dtype)}"
    with open(CACHE / "train.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a concurrent session waits for this one instead of training too
        if not (folder / "open_clip_model.safetensors").exists():
            bundle = load_model("TinyCLIP-RN32", device="cpu", seed=SMALL_TRAIN.seed)
            train = [r for r in read_manifest(world) if r.split == "train"]
            train_clip(bundle.model, bundle.tokenizer, load_images(train, 32), [r.caption for r in train], SMALL_TRAIN, progress=False)
            tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
            save_model(bundle, tmp)
            tmp.replace(folder)
    return folder


def pytest_sessionstart(session):
    """Under xdist, the controller builds the shared world and model before the workers start
    (xdist starts them in its own, later, sessionstart): on all cores, where a worker would build
    it on its one thread while the other worker waits for it."""
    if XDIST_WORKER is None and session.config.getoption("numprocesses", None):
        print(f"\nbuilding the shared test world and model (cached under {CACHE})", flush=True)
        _trained_model_dir(_small_world())


@pytest.fixture(scope="session")
def small_world() -> Path:
    """Manifest path of a small shapes world (16k train, 192 val, 384 test images)."""
    return _small_world()


@pytest.fixture(scope="session")
def small_records(small_world):
    """``{split: [Record]}`` of the small world."""
    records = read_manifest(small_world)
    return {split: [r for r in records if r.split == split] for split in ("train", "val", "test")}


@pytest.fixture(scope="session")
def trained_model_dir(small_world) -> Path:
    """Folder of a TinyCLIP-RN32 trained briefly on the small world (cached across sessions)."""
    return _trained_model_dir(small_world)


@pytest.fixture
def trained_bundle(trained_model_dir):
    """A fresh copy of the trained tiny CLIP, safe to modify."""
    return load_model(f"local-dir:{trained_model_dir}", device="cpu")


@pytest.fixture(scope="session")
def test_images(small_records):
    return load_images(small_records["test"], 32)


def best_known_subgroup(model, tokenizer, records, images) -> str:
    """The colour x shape subgroup ("blue circle") the model classifies best among the 48: weak test
    models barely know some of them, and a drop is only measurable from a high start."""
    from unlearning.evaluation import subgroup_task
    from unlearning.metrics import evaluate_task

    per_subgroup = evaluate_task(model, tokenizer, subgroup_task("colour", records), records, images).per_class
    return max(per_subgroup, key=per_subgroup.get)


@pytest.fixture
def store(mlflow_store, small_world, trained_model_dir, monkeypatch):
    """A fresh MLflow store whose champion (v1) is the small trained CLIP, with the small world
    as the reference data. Yields the settings."""
    from tasks import registry
    from tasks.settings import get_settings

    monkeypatch.setenv("ERASURE_REFERENCE_MANIFEST", str(small_world))
    get_settings.cache_clear()
    settings = get_settings()
    registry.configure_mlflow(settings)
    version = registry.register_model_folder(trained_model_dir, settings, tags={"erasure.targets": "[]", "erasure.request_ids": "[]"})
    registry.set_alias(settings.model_name, "champion", version.version)
    yield settings
    get_settings.cache_clear()
