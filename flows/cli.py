"""`erasure`: the command line over the flows.

    erasure demo                      bootstrap if needed, erase one shape end to end, print the table
    erasure run REQUEST.json [--report OUT.json]
    erasure submit REQUEST.json       file a request as received (prints its due date), without running it
    erasure status [REQUEST_ID]
    erasure rollback --to VERSION [--reason TEXT]
    erasure guard
    erasure purge [--dry-run] [--window-days D]
                                      delete the weights of versions that miss a promoted erasure, past the rollback window
    erasure bootstrap [--force]
    erasure register MODEL_REF [--name NAME] [--reference-manifest PATH]
                                      bring your own model: score it, register it, make it the champion
    erasure schema                    the request's JSON Schema
    erasure oracle CLASS... [--subgroup colour=red] [--joint]
                                      train the retrain oracles (the champion's recipe without the targets)
    erasure bench [--out DIR] [--oracle]
                                      every method on the embedded champion, against the oracles

Exit codes: 0 promoted (or a dry run whose gates passed), 2 rejected by the gates, 1 bad input or failure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from tasks.settings import quiet_telemetry

quiet_telemetry()  # before prefect/mlflow are imported anywhere


def _console():
    from rich.console import Console

    return Console()


def _settings():
    from tasks.settings import get_settings

    return get_settings()


def _ui_hint(settings) -> str:
    return f"mlflow ui --backend-store-uri {settings.tracking_uri} --host 127.0.0.1 --port 5000   (then open {settings.mlflow_ui_url})"


def print_table(report: dict, per_class_before: dict | None = None, per_class_after: dict | None = None) -> None:
    from rich.table import Table

    console = _console()
    if per_class_before:
        table = Table(title="zero-shot accuracy per class (test split)")
        table.add_column("class")
        table.add_column("before", justify="right")
        if per_class_after is not None:
            table.add_column("after", justify="right")
        for name in sorted(per_class_before):
            row = [name, f"{100 * per_class_before[name]:.1f} %"]
            if per_class_after is not None:
                row.append(f"{100 * per_class_after.get(name, float('nan')):.1f} %")
            table.add_row(*row)
        console.print(table)
    if report.get("before") is not None and report.get("after") is not None:
        table = Table(title=f"erasure {report['request_id']} ({report.get('method')}): {report.get('status')}")
        for column in ("metric", "before", "after", "change"):
            table.add_column(column, justify="left" if column == "metric" else "right")
        for key in sorted(set(report["before"]) | set(report["after"])):
            b, a = report["before"].get(key), report["after"].get(key)
            table.add_row(key, "" if b is None else f"{100 * b:.2f} %", "" if a is None else f"{100 * a:.2f} %",
                          "" if a is None or b is None else f"{100 * (a - b):+.2f} pt")
        console.print(table)
        for target, sides in (report.get("depth") or {}).get("targets", {}).items():
            depth = Table(title=f"depth of forgetting: {target} (docs/depth.md)")
            for column in ("measure", "before", "after", "retrain oracle"):
                depth.add_column(column, justify="left" if column == "measure" else "right")
            for key in sorted(sides["after"]):
                depth.add_row(key.removeprefix("depth/"), *(f"{sides[side][key]:.3f}" if sides.get(side) and key in sides[side] else "–"
                                                           for side in ("before", "after", "oracle")))
            console.print(depth)
        gates = Table(title="gates")
        for column in ("gate", "value", "threshold", "result"):
            gates.add_column(column)
        for g in report.get("gates", []):
            gates.add_row(g["name"], f"{g['value']:.4f}", f"{g['comparison']} {g['threshold']:.4f}", "pass" if g["passed"] else "[red]FAIL[/red]")
        console.print(gates)


def cmd_schema(args) -> int:
    from tasks.request import request_json_schema

    print(json.dumps(request_json_schema(), indent=2))
    return 0


def cmd_run(args) -> int:
    from flows.erasure import erasure_flow
    from tasks.request import load_request

    request = load_request(Path(args.request).read_text() if Path(args.request).is_file() else _missing(args.request))
    reference = _reference_choice(request.model)
    report = erasure_flow(request, reference.settings).model_dump(mode="json")
    if args.report:
        Path(args.report).write_text(json.dumps(report, indent=2, default=str))
    print_table(report)
    status = report.get("status")
    if report.get("idempotent"):
        _console().print(f"request {report['request_id']} was already handled: {status} {report.get('reason') or ''}")
        return 0 if status in ("promoted", "dry_run") else 2
    if status == "promoted" or (status == "dry_run" and report.get("gates_passed")):
        _console().print(f"[green]{status}[/green]: {report['request_id']} → model version {report.get('model_version')}")
        return 0
    reason = ", ".join(g["name"] for g in report.get("gates", []) if not g["passed"])
    _console().print(f"[red]{status}[/red]: {report['request_id']} — failed gates: {reason}; champion unchanged")
    return 2


def cmd_batch(args) -> int:
    from rich.table import Table

    from flows.batch import batch_flow
    from tasks.request import load_request

    submit = [load_request(Path(path).read_text() if Path(path).is_file() else _missing(path)) for path in args.requests]
    reference = _reference_choice(args.model)
    report = batch_flow(args.model, reference.settings, submit=submit, max_requests=args.max)
    if args.report:
        Path(args.report).write_text(report.model_dump_json(indent=2))
    console = _console()
    updates = Table(title=f"updates of {report.model_name} (champion v{report.champion_before} → v{report.champion_after})")
    for column in ("requests", "method", "decision", "version", "forget", "retain drop", "held-out drop", "unlearning"):
        updates.add_column(column)
    for u in report.updates:
        drop = {g.name: g.value for g in u.gates}
        updates.add_row(", ".join(u.request_ids), u.method, u.decision, u.model_version or "",
                        f"{100 * u.after.get('forget_accuracy', float('nan')):.1f} %",
                        f"{100 * drop.get('retain_accuracy_drop', float('nan')):+.1f} pt",
                        f"{100 * drop.get('heldout_accuracy_drop', float('nan')):+.1f} pt", f"{u.timings.unlearn_s:.0f} s")
    console.print(updates)
    outcomes = Table(title="requests")
    for column in ("request", "status", "version", "reason"):
        outcomes.add_column(column)
    for o in report.requests:
        colour = {"promoted": "green", "rejected": "red", "failed": "red"}.get(o.status, "white")
        outcomes.add_row(o.request_id, f"[{colour}]{o.status}[/{colour}]", o.model_version or "", o.reason[:80])
    console.print(outcomes)
    console.print(f"batch wall time {report.wall_s:.0f} s; review it in the MLflow UI:  {_ui_hint(reference.settings)}")
    return 0 if all(o.status in ("promoted", "dry_run") for o in report.requests) else 2


def _missing(path: str) -> str:
    raise FileNotFoundError(f"request file {path} does not exist: pass the path of an erasure request JSON (see `erasure schema`)")


def cmd_status(args) -> int:
    from mlflow import MlflowClient
    from rich.markup import escape
    from rich.table import Table

    from tasks import ledger
    from tasks.registry import configure_mlflow

    settings = _settings()
    configure_mlflow(settings)
    client = MlflowClient()
    if args.request_id:
        state = ledger.find(client, settings.experiment, args.request_id, warning_days=settings.deadline_warning_days)
        if state is None:
            print(f"no request {args.request_id!r} in the ledger", file=sys.stderr)
            return 1
        print(json.dumps(state.as_dict(), indent=2))
        return 0
    table = Table(title=f"erasure ledger ({settings.experiment})")
    for column in ("request", "status", "attempts", "due", "days left", "model version", "updated", "reason"):
        table.add_column(column, justify="right" if column in ("attempts", "days left") else "left")
    for state in ledger.entries(client, settings.experiment, warning_days=settings.deadline_warning_days):
        days_left = "" if state.days_left is None or state.status in ledger.TERMINAL else f"{state.days_left:.1f}"
        colour = {"overdue": "red", "due_soon": "yellow"}.get(state.deadline_flag)
        table.add_row(escape(state.request_id), state.status, str(len(state.attempts)), (state.due_at or "")[:10],
                      f"[{colour}]{days_left}[/{colour}]" if colour else days_left, state.model_version or "", state.updated,
                      escape(state.reason[:80]))
    _console().print(table)
    return 0


def cmd_submit(args) -> int:
    """File a request in the ledger as ``received`` without running it."""
    from tasks import intake, ledger
    from tasks.request import load_request

    request = load_request(args.request)
    try:
        filed = intake.submit(request, _settings())
    except ledger.RequestConflict as exc:
        print(f"erasure submit: conflict: {exc}", file=sys.stderr)
        return 2
    state = filed.state
    due = f"due {state.due_at[:10]} ({state.days_left:.0f} days left)" if state.due_at else "no due date recorded"
    if filed.filed:
        _console().print(f"filed {request.request_id} as received; {due}")
    else:
        _console().print(f"{request.request_id} is already in the ledger: {state.status} after {len(state.attempts)} attempt(s); {due}")
    return 0


def cmd_serve(args) -> int:
    """Run the service on this host until Ctrl-C / SIGTERM (infra/serve.py)."""
    from infra.serve import ServeOptions, serve

    return serve(_settings(), ServeOptions(inbox=args.inbox, batch_cron=args.batch_cron, guard_cron=args.guard_cron,
                                           prefect_port=args.port, bridge=not args.no_bridge))


def cmd_serve_model(args) -> int:
    """Serve the champion over REST and reload it on the pipeline's webhook (infra/model_server.py)."""
    from infra.model_server import DEFAULT_COMMAND, serve_model

    settings = _settings()
    # models:/NAME@champion resolves in our registry; MLflow's server starts `uvicorn` from PATH
    env = {**os.environ, "MLFLOW_TRACKING_URI": settings.tracking_uri,
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    return serve_model(args.model or settings.model_name, args.port, args.hook_port, command=args.serve_command or DEFAULT_COMMAND,
                       health_path=args.health_path, env=env, log_path=settings.home / "serve-model.log")


def cmd_bridge(args) -> int:
    """The S3 deletion bridge alone (tasks/bridge.py)."""
    import threading

    from tasks import bridge

    settings, config = _settings(), bridge.load_bridge_settings()
    if not config.queue_url:
        print("erasure bridge: error: set ERASURE_BRIDGE_QUEUE_URL (and ERASURE_BRIDGE_BUCKET, ERASURE_BRIDGE_MANIFEST)", file=sys.stderr)
        return 2
    if args.once:
        results = [*bridge.poll(settings, config), *bridge.reconcile(settings, config)]
        for result in results:
            _console().print(result)
        return 0
    bridge.run(settings, config, threading.Event())
    return 0


def cmd_inbox(args) -> int:
    """One pass over an inbox: file new requests, move finished and bad ones."""
    from tasks import inbox

    for item in inbox.scan(_settings(), args.location):
        _console().print(f"{item.name}: {item.outcome}" + (f" ({item.reason})" if item.reason else "")
                         + (f" -> {item.moved_to}" if item.moved_to else ""))
    return 0


def cmd_rollback(args) -> int:
    from prefect import flow

    from tasks.champion import rollback_champion
    from tasks.registry import configure_mlflow

    settings = _settings()
    configure_mlflow(settings)

    @flow(name="manual-rollback")
    def manual_rollback() -> dict:
        return rollback_champion(settings, settings.model_name, args.to, args.reason)

    result = manual_rollback()
    _console().print(f"champion of {settings.model_name} is now v{result['champion']} (was v{result['rolled_back']}); "
                     f"requests back to pending: {result['reopened_requests'] or 'none'}")
    return 0


def cmd_guard(args) -> int:
    from flows.guard import guard_flow

    reference = _reference_choice(None)
    verdict = guard_flow(settings=reference.settings)
    if verdict["passed"]:
        _console().print(f"[green]guard passed[/green]: champion v{verdict['champion']}")
        return 0
    rollback = verdict["rollback"]
    if "refused" in rollback:
        _console().print(f"[red]guard failed[/red]: {'; '.join(verdict['failures'])}; [red]rollback refused[/red]: {rollback['refused']}")
        return 2
    _console().print(f"[red]guard failed[/red]: {'; '.join(verdict['failures'])} → champion rolled back to v{rollback['champion']}")
    return 2


def cmd_purge(args) -> int:
    from rich.table import Table

    from flows.purge import purge_flow

    report = purge_flow(dry_run=args.dry_run, window_days=args.window_days)
    title = f"purge of {report.model} (rollback window {report.window_days:g} days)"
    table = Table(title=title + (": dry run, nothing changed" if report.dry_run else ""))
    for column in ("version", "action", "status", "weight files", "reason"):
        table.add_column(column, justify="right" if column == "weight files" else "left")
    for entry in report.purged + report.would_purge:
        action, status = ("purged", "purged") if entry.purged_at else ("would purge", "")
        table.add_row(entry.version, f"[red]{action}[/red]", status, f"{len(entry.files)} ({entry.bytes / 1e6:.1f} MB)", entry.reason)
    for kept in report.kept:
        table.add_row(kept.version, "kept", kept.status, "", kept.reason)
    console = _console()
    console.print(table)
    if report.uncertified_requests:
        console.print(f"[yellow]warning[/yellow]: no ledger run for {', '.join(report.uncertified_requests)}: "
                      f"their certificates do not list the purge")
    return 0


def _reference_choice(model_name: str | None):
    """The reference manifest the champion was registered with (unless configured), warning on a mismatch."""
    from tasks.register import reference_for_champion
    from tasks.registry import configure_mlflow

    settings = _settings()
    configure_mlflow(settings)
    choice = reference_for_champion(settings, model_name)
    if choice.warning:
        _console().print(f"[yellow]warning[/yellow]: {choice.warning}")
    elif choice.registered:
        _console().print(f"reference manifest: {choice.manifest} (recorded when the champion was registered)")
    return choice


def cmd_register(args) -> int:
    from rich.table import Table

    from flows.register import register_flow

    result = register_flow(args.model_ref, name=args.name, reference_manifest=args.reference_manifest)
    table = Table(title=f"registered {result['name']} v{result['version']}", show_header=False)
    table.add_column("what")
    table.add_column("value")
    previous = result["aliases"]["previous"]
    for key, value in (("model", result["model_ref"]), ("reference manifest", f"{result['reference_manifest']} (sha {result['reference_hash']})"),
                       ("zero-shot accuracy", f"{100 * result['accuracy']:.1f} % on {result['test_images']} test images"),
                       ("held-out accuracy", f"{100 * result['metrics'].get('heldout_accuracy', float('nan')):.1f} % ({result['heldout_suite']})"),
                       ("aliases", f"champion → v{result['version']}" + (f", previous → v{previous}" if previous else ""))):
        table.add_row(key, value)
    console = _console()
    console.print(table)
    per_class = Table(title="zero-shot accuracy per class (test split)")
    per_class.add_column("class")
    per_class.add_column("accuracy", justify="right")
    for name in sorted(result["per_class"]):
        per_class.add_row(name, f"{100 * result['per_class'][name]:.1f} %")
    console.print(per_class)
    if result["reopened_requests"]:
        console.print(f"[yellow]requests back to pending[/yellow] (v{previous} carried them, the new model does not): "
                      f"{', '.join(result['reopened_requests'])}")
    console.print(f"[green]champion[/green]: {result['name']} v{result['version']}. Review it in the MLflow UI:  {_ui_hint(_settings())}")
    return 0


def cmd_bootstrap(args) -> int:
    from flows.bootstrap import bootstrap_flow

    result = bootstrap_flow(force=args.force)
    print(json.dumps({k: v for k, v in result.items() if k != "per_class"}, indent=2, default=str))
    return 0


def cmd_demo(args) -> int:
    """Bootstrap if needed, then erase one shape class end to end and print before/after."""
    from flows.bootstrap import bootstrap_flow
    from flows.erasure import erasure_flow
    from tasks import registry
    from tasks.champion import carried
    from tasks.registry import configure_mlflow
    from unlearning.world import SHAPES

    settings = _settings()
    configure_mlflow(settings)
    _console().print(f"precision: {_precision_line(settings)}")
    boot = bootstrap_flow()
    champion = registry.get_version_by_alias(settings.model_name, "champion")
    erased = {t.name for t in carried(champion.tags)[0]}
    shape = args.target or next((s for s in SHAPES if s not in erased), None)
    if shape is None:
        _console().print("every shape is already erased from the champion: nothing left to demo (run `make clean` to start over)")
        return 0
    request = {"request_id": f"demo-{shape}-{datetime.now(timezone.utc):%Y%m%dT%H%M%S}", "requester": "demo@clip-erasure",
               "target": {"kind": "class", "class_name": shape}, "method": args.method}
    started = time.perf_counter()
    report = erasure_flow(request).model_dump(mode="json")
    wall = time.perf_counter() - started
    print_table(report, report.get("per_class_before"), report.get("per_class_after"))
    timings = report.get("timings") or {}
    compute = timings.get("unlearn_s", 0.0) + timings.get("evaluate_s", 0.0)
    data = timings.get("load_champion_s", 0.0) + timings.get("data_and_validation_s", 0.0)
    _console().print(f"erasure wall time {wall:.0f} s = compute {compute:.0f} s (unlearning {timings.get('unlearn_s', 0):.0f} s, "
                     f"evaluation {timings.get('evaluate_s', 0):.0f} s) + data & validation {data:.0f} s "
                     f"+ orchestration {wall - compute - data:.0f} s (Prefect, MLflow, plots, registration)")
    _console().print(f"bootstrap: {'reused champion v' + boot['version'] if boot.get('skipped') else 'trained v' + boot['version']}")
    _console().print(f"erasure of '{shape}': [bold]{report['status']}[/bold] (model version {report.get('model_version')}, "
                     f"method {report['method']}); forget {100 * report['after'].get('forget_accuracy', float('nan')):.1f} %, "
                     f"retain {100 * report['before'].get('retain_accuracy', float('nan')):.1f} → {100 * report['after'].get('retain_accuracy', float('nan')):.1f} %")
    _console().print(f"Review it in the MLflow UI:  {_ui_hint(settings)}")
    return 0 if report["status"] == "promoted" else 2


def _precision_line(settings) -> str:
    from unlearning.models import pick_device
    from unlearning.precision import resolve_precision

    device = pick_device(settings.device)
    train, unlearn = (resolve_precision(settings.precision, device, stage) for stage in ("train", "unlearn"))
    return f"training {train.dtype} ({train.reason}); unlearning and evaluation {unlearn.dtype} on {device}"


@contextlib.contextmanager
def _embedded_champion(settings, prefix: str) -> Iterator[Path]:
    """Version 1 of the model (the bootstrapped embedded champion, trained first if needed),
    downloaded for the ``with`` block and removed after it."""
    import tempfile

    from flows.bootstrap import bootstrap_flow
    from tasks import registry
    from tasks.registry import configure_mlflow

    configure_mlflow(settings)
    bootstrap_flow()
    with tempfile.TemporaryDirectory(prefix=prefix) as scratch:
        yield registry.download_version(settings.model_name, "1", Path(scratch))


def cmd_oracle(args) -> int:
    """Train (or find cached) the retrain oracles of the embedded world: the champion's recipe from
    scratch without each target's images (unlearning/oracle.py)."""
    from unlearning.oracle import TrainingRecipe, read_recipe, train_oracle
    from unlearning.target import ForgetTarget

    settings = _settings()
    with _embedded_champion(settings, "oracle-recipe-") as folder:
        recipe = read_recipe(folder)
    if recipe is None:
        _console().print("version 1 has no training_recipe.json (bootstrapped before recipes were stored): using the bootstrap's defaults")
        recipe = TrainingRecipe()
    manifest = settings.reference_manifest_path
    if args.subgroup and "=" not in args.subgroup:
        _console().print(f"--subgroup: {args.subgroup!r} is not ATTRIBUTE=VALUE — use e.g. --subgroup colour=red")
        return 1
    attribute, value = args.subgroup.split("=", 1) if args.subgroup else (None, None)
    targets = [ForgetTarget(kind="subgroup", class_name=c, attribute=attribute, value=value) if attribute else
               ForgetTarget(kind="class", class_name=c) for c in args.targets]
    groups = [targets] if args.joint else [[t] for t in targets]
    for group in groups:
        started = time.perf_counter()
        try:
            oracle = train_oracle(manifest, group, recipe, settings.oracle_dir, device=settings.device)
        except ValueError as exc:
            _console().print(f"[red]{exc}[/red]")
            return 1
        _console().print(f"oracle without {', '.join(t.name for t in group)}: {oracle} ({time.perf_counter() - started:.0f} s)")
    return 0


def cmd_bench(args) -> int:
    """Benchmark every method on the registered champion (bootstrapped first if needed)."""
    from tasks.report import bench_plot, depth_bench_plot
    from unlearning.bench import run_bench

    settings = _settings()
    # version 1 is the bootstrapped embedded model: every method starts from it, before any erasure
    manifest = settings.reference_manifest_path
    out = Path(args.out)
    with _embedded_champion(settings, "bench-champion-") as folder:
        result = run_bench(str(folder), str(manifest), out, args.methods, args.seeds, args.classes, args.kinds, device=settings.device,
                           oracle_dir=settings.oracle_dir if args.oracle else None, depth=args.depth or None,
                           variants=json.loads(Path(args.variants).read_text()) if args.variants else ())
    bench_plot(result["summary"]).savefig(out / "bench.png", dpi=120)
    written = [out / "bench.json", out / "bench.md", out / "bench.png"]
    for kind in sorted({e["kind"] for e in result["summary"] if e.get("depth/knn")}):
        depth_bench_plot(result["summary"], kind).savefig(out / f"bench-depth-{kind}.png", dpi=120)
        written.append(out / f"bench-depth-{kind}.png")
    print((out / "bench.md").read_text())
    _console().print(f"wrote {', '.join(map(str, written))}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="erasure", description="Make CLIP models forget, prove it, never promote a model that forgot too much.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("schema", help="print the erasure request JSON Schema").set_defaults(fn=cmd_schema)
    run = sub.add_parser("run", help="carry out one erasure request")
    run.add_argument("request", help="path of the request JSON")
    run.add_argument("--report", help="write the report JSON here")
    run.set_defaults(fn=cmd_run)
    status = sub.add_parser("status", help="the ledger: every request's state")
    status.add_argument("request_id", nargs="?")
    status.set_defaults(fn=cmd_status)
    submit = sub.add_parser("submit", help="file a request in the ledger as received, without running it")
    submit.add_argument("request", help="path of the request JSON")
    submit.set_defaults(fn=cmd_submit)
    rollback = sub.add_parser("rollback", help="move champion back to an earlier version")
    rollback.add_argument("--to", help="version to restore (default: the 'previous' alias)")
    rollback.add_argument("--reason", default="manual rollback")
    rollback.set_defaults(fn=cmd_rollback)
    sub.add_parser("guard", help="re-check the champion; roll back automatically when it fails").set_defaults(fn=cmd_guard)
    purge = sub.add_parser("purge", help="delete the weights of versions that miss a promoted erasure, past the rollback window")
    purge.add_argument("--dry-run", action="store_true", help="list what would be purged, and why; change nothing")
    purge.add_argument("--window-days", type=float, help="rollback window in days (default: ERASURE_ROLLBACK_WINDOW_DAYS, 7); 0 purges at once")
    purge.set_defaults(fn=cmd_purge)
    register = sub.add_parser("register", help="bring your own model: score it on the reference data, register it as champion")
    register.add_argument("model_ref", metavar="MODEL_REF", help="NAME:PRETRAINED (e.g. ViT-B-32:openai), local-dir:/path or s3://bucket/prefix")
    register.add_argument("--name", help="registered model name (default: ERASURE_MODEL_NAME)")
    register.add_argument("--reference-manifest", help="the owner's manifest with splits train/val/test (default: ERASURE_REFERENCE_MANIFEST)")
    register.set_defaults(fn=cmd_register)
    boot = sub.add_parser("bootstrap", help="train and register the embedded tiny CLIP")
    boot.add_argument("--force", action="store_true")
    boot.set_defaults(fn=cmd_bootstrap)
    batch = sub.add_parser("batch", help="erase every pending request of a model in as few updates as the gates allow")
    batch.add_argument("requests", nargs="*", help="request JSON files to file first (optional)")
    batch.add_argument("--model", help="registered model (default: ERASURE_MODEL_NAME)")
    batch.add_argument("--max", type=int, help="at most this many requests, the most urgent first (default: ERASURE_BATCH_MAX_REQUESTS)")
    batch.add_argument("--report", help="write the batch report JSON here")
    batch.set_defaults(fn=cmd_batch)
    serve = sub.add_parser("serve", help="run the service: scheduled and event-triggered batches, guard, purge, inbox, deletion bridge")
    serve.add_argument("--inbox", help="folder or s3://bucket/prefix/ of request files (default: ERASURE_HOME/inbox)")
    serve.add_argument("--batch-cron", help="batch schedule, cron in UTC (default: ERASURE_BATCH_CRON or hourly)")
    serve.add_argument("--guard-cron", help="guard schedule, cron in UTC (default: ERASURE_GUARD_CRON or hourly at :30)")
    serve.add_argument("--port", type=int, default=4200, help="port of the local Prefect server when PREFECT_API_URL is unset")
    serve.add_argument("--no-bridge", action="store_true", help="do not run the deletion bridge even if ERASURE_BRIDGE_QUEUE_URL is set")
    serve.set_defaults(fn=cmd_serve)
    serve_model = sub.add_parser("serve-model", help="serve the champion over REST and reload it when the pipeline's webhook says it moved")
    serve_model.add_argument("--model", help="registered model (default: ERASURE_MODEL_NAME)")
    serve_model.add_argument("--port", type=int, default=5001, help="port of the model's REST server (default 5001)")
    serve_model.add_argument("--hook-port", type=int, default=5002, help="port of the webhook receiver: ERASURE_WEBHOOK_URL=http://HOST:PORT/")
    serve_model.add_argument("--command", dest="serve_command", help="the serving command, with {model} and {port} (default: mlflow models serve … --env-manager local)")
    serve_model.add_argument("--health-path", default="/ping", help="path that answers 200 once the server serves (default /ping)")
    serve_model.set_defaults(fn=cmd_serve_model)
    bridge = sub.add_parser("bridge", help="turn S3 deletion notifications (via SQS) into erasure requests (ERASURE_BRIDGE_* settings)")
    bridge.add_argument("--once", action="store_true", help="one poll and one reconciliation, then exit")
    bridge.set_defaults(fn=cmd_bridge)
    inbox = sub.add_parser("inbox", help="file the request files of an inbox once (erasure serve watches it continuously)")
    inbox.add_argument("location", nargs="?", help="folder or s3://bucket/prefix/ (default: ERASURE_HOME/inbox)")
    inbox.set_defaults(fn=cmd_inbox)
    demo = sub.add_parser("demo", help="bootstrap if needed and erase one shape end to end")
    demo.add_argument("--target", help="shape to erase (default: the first one not erased yet)")
    demo.add_argument("--method", default="auto")
    demo.set_defaults(fn=cmd_demo)
    oracle = sub.add_parser("oracle", help="train the retrain oracles (the champion's recipe without the targets) of the embedded world")
    oracle.add_argument("targets", nargs="+", help="class names (e.g. circle square)")
    oracle.add_argument("--subgroup", help="ATTRIBUTE=VALUE: the subgroup of each class instead (e.g. colour=red)")
    oracle.add_argument("--joint", action="store_true", help="one oracle without all the targets (a champion carrying several)")
    oracle.set_defaults(fn=cmd_oracle)
    bench = sub.add_parser("bench", help="benchmark every method on the embedded champion")
    bench.add_argument("--out", default="docs/bench")
    bench.add_argument("--methods", nargs="*", help="default: all six")
    bench.add_argument("--seeds", nargs="*", type=int, default=[0, 1])
    bench.add_argument("--classes", nargs="*", help="default: every class")
    bench.add_argument("--kinds", nargs="*", default=["class", "subgroup", "association"])
    bench.add_argument("--oracle", action="store_true", help="train (cached) the retrain oracle of each class and subgroup case and "
                       "report every method's depth of forgetting against it")
    bench.add_argument("--depth", action="store_true", help="depth measures without oracles")
    bench.add_argument("--variants", help='JSON list of {"label", "method", "config"} runs to add (e.g. infra/deeper-forgetting.json)')
    bench.set_defaults(fn=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # one clear line for users; the traceback on demand
        if os.environ.get("ERASURE_DEBUG"):
            raise
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"erasure {args.command}: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
