"""The pipeline's Prefect deployments, defined once as data.

Two renderings of the same list:

- :func:`deployments` builds them for ``serve()`` on one host (``erasure serve``, or
  ``python -m infra.deployments``);
- :func:`prefect_yaml` renders ``infra/prefect.yaml`` for ``prefect deploy --all`` on work pools
  (``python -m infra.deployments --write-yaml``; a test checks that the file on disk is current);
- :func:`deploy_to_work_pools` registers them on process work pools from Python, code read from a
  local checkout (``python -m infra.deployments --work-pools``).

The deployments:

- ``erasure-batch/scheduled``: every pending request of the model, in as few updates as the
  gates allow, on a cron schedule (``ERASURE_BATCH_CRON``, default hourly).
- ``erasure-batch/on-event``: the same flow when a request is filed (``clip-erasure.request.received``,
  posted by the inbox, the deletion bridge or ``erasure submit`` against a server); the event
  names the model.
- ``guard/scheduled``: re-checks the champion (``ERASURE_GUARD_CRON``, default hourly at :30) and
  rolls back automatically.
- ``purge/daily``: deletes the weights of versions that miss a promoted erasure once the rollback
  window has passed.

One erasure per registered model at a time comes from the per-model lock (tasks/locks.py: a
Prefect global concurrency limit ``model:<name>`` when a server is configured, a file lock
otherwise), which later runs wait on in order (enqueue), across deployments and hosts. Not from
a deployment concurrency limit: a run killed with its process keeps the deployment's slot
(``AwaitingConcurrencySlot`` for every later run, seen after a ``kill -9``), while the lock's
lease runs out.
Schedules and event triggers need a Prefect server: they never fire in ephemeral mode.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from tasks.events import REQUEST_RECEIVED

YAML_PATH = Path(__file__).with_name("prefect.yaml")
REPO_ROOT = Path(__file__).resolve().parents[1]
TAGS = ["clip-erasure"]


@dataclass(frozen=True)
class Deployment:
    """One deployment: which flow, when it runs, and on which work pool when deployed to pools."""

    flow: str  # entrypoint, "path/to/file.py:function"
    name: str
    cron: str | None = None
    on_event: str | None = None
    parameters_from_event: dict[str, str] = field(default_factory=dict)  # parameter -> Jinja template
    work_pool: str = "cpu"
    description: str = ""

    @property
    def flow_name(self) -> str:
        return {"flows/batch.py:batch_flow": "erasure-batch", "flows/guard.py:guard_flow": "guard",
                "flows/purge.py:purge_flow": "purge"}[self.flow]

    @property
    def full_name(self) -> str:
        return f"{self.flow_name}/{self.name}"


def definitions(batch_cron: str | None = None, guard_cron: str | None = None, purge_cron: str | None = None,
                gpu_pool: str | None = None) -> list[Deployment]:
    """The deployments, with schedules from the arguments, else ``ERASURE_*_CRON``, else the defaults.

    Args:
        gpu_pool: the work pool that runs unlearning (the batch flows); default ``ERASURE_GPU_POOL``
            or "gpu". The guard and the purge run on the "cpu" pool.
    """
    gpu = gpu_pool or os.environ.get("ERASURE_GPU_POOL", "gpu")
    return [
        Deployment("flows/batch.py:batch_flow", "scheduled", cron=batch_cron or os.environ.get("ERASURE_BATCH_CRON", "0 * * * *"),
                   work_pool=gpu, description="Every pending erasure request of the model, the most urgent first, in as few updates as the gates allow."),
        Deployment("flows/batch.py:batch_flow", "on-event", on_event=REQUEST_RECEIVED,
                   parameters_from_event={"model_name": "{{ event.payload.model }}"}, work_pool=gpu,
                   description="The batch flow as soon as a request is filed (inbox, deletion bridge, erasure submit)."),
        Deployment("flows/guard.py:guard_flow", "scheduled", cron=guard_cron or os.environ.get("ERASURE_GUARD_CRON", "30 * * * *"),
                   description="Re-check the champion; roll back automatically when it fails."),
        Deployment("flows/purge.py:purge_flow", "daily", cron=purge_cron or os.environ.get("ERASURE_PURGE_CRON", "30 3 * * *"),
                   description="Delete the weights of superseded versions past the rollback window."),
    ]


def _trigger(spec: Deployment) -> dict:
    return {"type": "event", "enabled": True, "expect": [spec.on_event], "match": {"prefect.resource.id": "clip-erasure.request.*"},
            "parameters": dict(spec.parameters_from_event)}


def _flow(spec: Deployment):
    from flows.batch import batch_flow
    from flows.guard import guard_flow
    from flows.purge import purge_flow

    return {"erasure-batch": batch_flow, "guard": guard_flow, "purge": purge_flow}[spec.flow_name]


def _when(spec: Deployment) -> dict:
    """The ``schedules``/``triggers`` arguments of ``to_deployment`` for ``spec``."""
    from prefect.events import DeploymentEventTrigger
    from prefect.schedules import Cron

    options = {}
    if spec.cron:
        options["schedules"] = [Cron(spec.cron, timezone="UTC")]
    if spec.on_event:
        trigger = _trigger(spec)
        options["triggers"] = [DeploymentEventTrigger(expect=set(trigger["expect"]), match=trigger["match"],
                                                      parameters=trigger["parameters"])]
    return options


def deployments(specs: list[Deployment] | None = None) -> list:
    """The deployments as Prefect ``RunnerDeployment`` objects, for ``serve()``."""
    return [_flow(spec).to_deployment(name=spec.name, tags=TAGS, description=spec.description, **_when(spec))
            for spec in specs or definitions()]


def deploy_to_work_pools(specs: list[Deployment] | None = None, pool: str | None = None,
                         code_dir: str | Path | None = None) -> dict[str, str]:
    """Register the deployments with the Prefect server at ``PREFECT_API_URL``, each on its process
    work pool (created when missing), as ``prefect deploy --all`` does with ``prefect.yaml``.

    Workers run them with ``prefect worker start --pool NAME --type process``, from ``code_dir``.

    Args:
        pool: one work pool for all of them instead of each definition's own (``gpu``/``cpu``).
        code_dir: where workers find the code (the flow runs' working directory); default this checkout.

    Returns:
        ``{"erasure-batch/on-event": deployment id, ...}``.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists
    from prefect.runner.storage import LocalStorage
    from prefect.settings import get_current_settings
    from prefect.workers.process import ProcessWorker

    if not get_current_settings().api.url:
        raise ValueError("PREFECT_API_URL is not set: work pools need a Prefect server, e.g. "
                         "PREFECT_API_URL=http://127.0.0.1:4200/api after `prefect server start`")
    specs = specs or definitions()
    code = Path(code_dir or REPO_ROOT).resolve()
    if not all((code / spec.flow.split(":")[0]).is_file() for spec in specs):
        raise ValueError(f"code_dir {code} does not hold the flows (e.g. flows/batch.py): give the repository root")
    with get_client(sync_client=True) as client:
        for name in sorted({pool or spec.work_pool for spec in specs}):
            try:
                client.create_work_pool(WorkPoolCreate(name=name, type="process",
                                                       base_job_template=ProcessWorker.get_default_base_job_template()))
            except ObjectAlreadyExists:  # made earlier, or by a worker that started first
                pass
    registered = {}
    for spec in specs:
        deployment = _flow(spec).to_deployment(name=spec.name, tags=TAGS, description=spec.description,
                                               work_pool_name=pool or spec.work_pool, **_when(spec))
        # Workers load the entrypoint from the code folder (a set_working_directory pull step).
        deployment.entrypoint = spec.flow
        deployment.storage = LocalStorage(path=str(code))
        registered[spec.full_name] = str(deployment.apply())
    return registered


def prefect_yaml(specs: list[Deployment] | None = None) -> str:
    """``infra/prefect.yaml`` for work pools: the same deployments, each on its pool."""
    entries = []
    for spec in specs or definitions(batch_cron="0 * * * *", guard_cron="30 * * * *", purge_cron="30 3 * * *", gpu_pool="gpu"):
        entry = {"name": spec.name, "description": spec.description, "entrypoint": spec.flow, "tags": list(TAGS),
                 "work_pool": {"name": spec.work_pool}}
        if spec.cron:
            entry["schedules"] = [{"cron": spec.cron, "timezone": "UTC"}]
        if spec.on_event:
            entry["triggers"] = [_trigger(spec)]
        entries.append(entry)
    document = {"name": "clip-erasure", "prefect-version": "3.9.1",
                "pull": [{"prefect.deployments.steps.set_working_directory": {"directory": "/opt/clip-erasure"}}],
                "deployments": entries}
    header = ("# Generated by `python -m infra.deployments --write-yaml` from infra/deployments.py: edit that, not this.\n"
              "# Deploy to work pools with `prefect deploy --all` from the repository root. Workers:\n"
              "#   prefect worker start --pool gpu   (unlearning: the batch flows; see infra/k8s/ for a GPU node pool)\n"
              "#   prefect worker start --pool cpu   (guard and purge)\n"
              "# Code is read from the worker's working directory (/opt/clip-erasure in the images).\n")
    return header + yaml.safe_dump(document, sort_keys=False, width=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra.deployments", description=__doc__.splitlines()[0])
    parser.add_argument("--write-yaml", action="store_true", help=f"write {YAML_PATH.name} from the definitions and exit")
    parser.add_argument("--work-pools", action="store_true",
                        help="register the deployments on process work pools at PREFECT_API_URL (code: this checkout) and exit")
    parser.add_argument("--pool", help="with --work-pools: one pool for all deployments instead of gpu/cpu")
    args = parser.parse_args(argv)
    if args.write_yaml:
        YAML_PATH.write_text(prefect_yaml())
        print(f"wrote {YAML_PATH}")
        return 0
    if args.work_pools:
        for name, deployment_id in deploy_to_work_pools(pool=args.pool).items():
            print(f"registered {name} ({deployment_id})")
        return 0
    if args.pool:
        parser.error("--pool goes with --work-pools")
    from prefect import serve

    serve(*deployments())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
