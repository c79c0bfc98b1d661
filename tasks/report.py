"""What people would rather see than read: plots, image grids, the gate table and certificates."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # headless: plots go to files and MLflow, never to a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402


def metric_name(key: str) -> str:
    """An MLflow-legal metric name: "@" spelled out, other characters MLflow refuses (an
    association's "caption|caption" name) as "_"."""
    return re.sub(r"[^\w\-. :/]", "_", key.replace("@", "_at_"))


def image_grid(images: torch.Tensor, columns: int = 8, scale: int = 3) -> Image.Image:
    """uint8 ``N x 3 x H x W`` images tiled into one PIL image, upscaled for viewing."""
    n = len(images)
    if n == 0:
        return Image.new("RGB", (8, 8))
    columns = min(columns, n)
    rows = math.ceil(n / columns)
    _, _, h, w = images.shape
    grid = np.full((rows * (h + 1) + 1, columns * (w + 1) + 1, 3), 255, dtype=np.uint8)
    for i, image in enumerate(images.permute(0, 2, 3, 1).cpu().numpy()):
        r, c = divmod(i, columns)
        grid[1 + r * (h + 1): 1 + r * (h + 1) + h, 1 + c * (w + 1): 1 + c * (w + 1) + w] = image
    picture = Image.fromarray(grid)
    return picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)


def per_class_plot(before: dict[str, float], after: dict[str, float], forgotten: Sequence[str], title: str):
    """Grouped bars of per-class zero-shot accuracy before and after; forgotten classes in red."""
    names = sorted(set(before) | set(after))
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(6, len(names) * 0.8), 3.6))
    ax.bar(x - 0.2, [100 * before.get(n, float("nan")) for n in names], 0.4, label="before", color="#9aa5b1")
    ax.bar(x + 0.2, [100 * after.get(n, float("nan")) for n in names], 0.4, label="after", color="#2b6cb0")
    ax.set_xticks(x, names, rotation=30, ha="right")
    for tick, name in zip(ax.get_xticklabels(), names):
        if name in forgotten:
            tick.set_color("#c53030")
            tick.set_fontweight("bold")
    ax.set_ylabel("zero-shot accuracy (%)")
    ax.set_ylim(0, 105)
    ax.set_title(title, fontsize=9)
    ax.legend(loc="lower right")
    fig.tight_layout()
    return fig


def confusion_plot(confusion: torch.Tensor, classnames: Sequence[str], title: str):
    """Row-normalised confusion matrix (true class by row)."""
    matrix = confusion.float()
    matrix = matrix / matrix.sum(dim=1, keepdim=True).clamp(min=1)
    size = max(4, 0.45 * len(classnames) + 1.5)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(matrix.numpy(), cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classnames)), classnames, rotation=90, fontsize=7)
    ax.set_yticks(range(len(classnames)), classnames, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def history_plot(history: Sequence[dict], keys: Sequence[str], title: str):
    """Per-step curves of the numeric ``keys`` found in a method's history."""
    fig, ax = plt.subplots(figsize=(6, 3.4))
    for key in keys:
        points = [(row.get("step", i), row[key]) for i, row in enumerate(history) if isinstance(row.get(key), (int, float))]
        if points:
            ax.plot(*zip(*points), label=key)
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    return fig


def gate_markdown(gates: Sequence[dict]) -> str:
    rows = ["| gate | value | threshold | result | what it checks |", "|---|---|---|---|---|"]
    for g in gates:
        rows.append(f"| {g['name']} | {g['value']:.4f} | {g['comparison']} {g['threshold']:.4f} | {'pass' if g['passed'] else '**FAIL**'} "
                    f"| {g.get('description', '')} |")
    return "\n".join(rows)


def metrics_markdown(before: dict[str, float], after: dict[str, float]) -> str:
    rows = ["| metric | before | after | change |", "|---|---|---|---|"]
    for key in sorted(set(before) | set(after)):
        b, a = before.get(key), after.get(key)
        change = f"{100 * (a - b):+.2f} pt" if a is not None and b is not None else ""
        fmt = lambda v: "" if v is None else f"{100 * v:.2f} %"  # noqa: E731
        rows.append(f"| {key} | {fmt(b)} | {fmt(a)} | {change} |")
    return "\n".join(rows)


def _data_line(data: dict) -> str:
    """The certificate's account of the data (``tasks.data.data_summary``)."""
    return (f"- Data: {data['forget_images']} forget images from the {data['forget_source']} "
            f"({data['forget_rows_in_reference']} of the forget rows are the owner's reference images, kept out of the "
            f"retain data); {data['retain_images']} retain images from the {data['retain_source']}")


def write_certificate(folder: Path, certificate: dict) -> tuple[Path, Path]:
    """The erasure certificate as JSON and markdown: what was forgotten, where, with what evidence."""
    folder.mkdir(parents=True, exist_ok=True)
    json_path = folder / "certificate.json"
    json_path.write_text(json.dumps(certificate, indent=2, default=str))
    lines = [
        f"# Erasure certificate — request `{certificate['request_id']}`",
        "",
        f"- Requested by: {certificate['requester']} at {certificate['requested_at']}",
        f"- Target: {certificate['target']}",
        f"- Method: {certificate['method']}",
        f"- Model: `{certificate['model_name']}` version {certificate['model_version']} (parent {certificate['parent_version']})",
        f"- Decision: **{certificate['decision']}**",
        *([_serving_line(certificate["serving"])] if certificate["decision"] == "promoted" and "serving" in certificate else []),
        f"- Forget targets carried by this version: {', '.join(certificate['carried_targets'])}",
        *([_data_line(certificate["data"])] if certificate.get("data") else []),
        *([f"- Held-out suite: {certificate['heldout_suite']['name']} ({certificate['heldout_suite']['kind']}; "
           f"probes: {', '.join(certificate['heldout_suite']['probes']) or 'none'})"] if certificate.get("heldout_suite") else []),
        "",
        "## Evidence",
        "",
        metrics_markdown(certificate["before"], certificate["after"]),
        "",
        *(depth_markdown(certificate["depth"]) if certificate.get("depth", {}).get("after") else []),
        "## Gates",
        "",
        gate_markdown(certificate["gates"]),
    ]
    md_path = folder / "certificate.md"
    md_path.write_text("\n".join(lines) + "\n")
    return json_path, md_path


def _serving_line(serving: dict) -> str:
    if serving.get("in_service_at"):
        return f"- In service: {serving['in_service_at']} (the serving webhook's receiver reloaded the champion)"
    if serving.get("notified_at"):
        return f"- Serving notified: {serving['notified_at']} (the receiver did not say when the model went into service)"
    return "- In service: not known (no serving webhook confirmed; ERASURE_WEBHOOK_URL)"


DEPTH_NOTES = {"relearn": "accuracy after n relearning steps on 8 images", "probe": "linear probe, balanced accuracy",
               "knn": "10-NN recall in image space", "mia_auc": "membership inference AUC (0.5: indistinguishable)",
               "paraphrase": "zero-shot accuracy, unseen prompts", "forget_R@5": "own caption in the top 5"}


def depth_markdown(depth: dict) -> list[str]:
    """The certificate's depth table: each measure before, after and for the retrain oracle (docs/depth.md)."""
    oracle = depth.get("oracle") or {}
    lines = ["## Depth of forgetting", "",
             f"Protocols: docs/depth.md. Oracle: {depth.get('oracle_model') or 'none cached for this model and target'}.", "",
             "| measure | before | after | retrain oracle | what it is |", "|---|---|---|---|---|"]
    for key in sorted(depth["after"]):
        short = key.removeprefix("depth/")
        note = DEPTH_NOTES.get(short.split("@")[0] if short.startswith("relearn") else short, "")
        cells = [f"{depth[side][key]:.3f}" if depth.get(side) and key in depth[side] else "–" for side in ("before", "after")]
        cells.append(f"{oracle[key]:.3f}" if key in oracle else "–")
        lines.append(f"| {short} | {' | '.join(cells)} | {note} |")
    return [*lines, ""]


def depth_bench_plot(summary: Sequence[dict], kind: str = "class"):
    """The depth measures of every model of one case kind, one group of bars per measure, with the
    retrain oracle's value drawn as a line across each group (closer to the line is deeper)."""
    keys = ["depth/relearn@10", "depth/forget_R@5", "depth/knn", "depth/probe", "depth/mia_auc", "depth/paraphrase"]
    entries = [e for e in summary if e["kind"] == kind and e.get("depth/knn")]
    models = [e for e in entries if e["method"] != "oracle"]
    oracle = next((e for e in entries if e["method"] == "oracle"), None)
    fig, ax = plt.subplots(figsize=(12, 5))
    width = 0.8 / max(1, len(models))
    for n, entry in enumerate(models):
        xs = [i - 0.4 + width * (n + 0.5) for i in range(len(keys))]
        ax.bar(xs, [entry[k]["mean"] if entry.get(k) else float("nan") for k in keys], width=width, label=entry["method"])
    if oracle:
        for i, key in enumerate(keys):
            if oracle.get(key):
                ax.hlines(oracle[key]["mean"], i - 0.45, i + 0.45, colors="black", linewidth=2, label="retrain oracle" if i == 0 else None)
    ax.set_xticks(range(len(keys)), [k.removeprefix("depth/") for k in keys])
    ax.set_ylim(0, 1.05)
    ax.set_title(f"depth of forgetting, {kind} targets (black: the retrain oracle)")
    ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.08))
    fig.tight_layout()
    return fig


def bench_plot(summary: Sequence[dict]):
    """Forget accuracy against retained-accuracy drop per method and case kind (lower-left is better)."""
    kinds = sorted({e["kind"] for e in summary})
    fig, axes = plt.subplots(1, len(kinds), figsize=(5 * len(kinds), 4), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        for e in (e for e in summary if e["kind"] == kind):
            drop = e["sibling_drop"] if kind == "subgroup" else e["retain_R@5_drop"] if kind == "association" else e["retain_drop"]
            if not e["forget"] or not drop:
                continue
            ax.errorbar(100 * drop["mean"], 100 * e["forget"]["mean"], xerr=100 * drop["std"], yerr=100 * e["forget"]["std"],
                        fmt="o", capsize=3, label=e["method"])
        ax.set_xlabel("retained drop (points)")
        ax.set_ylabel("forget accuracy / R@5 (%)")
        ax.set_title(kind)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
