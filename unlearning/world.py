"""The embedded shapes world: a deterministic, captioned synthetic image data set.

Pretrained CLIP weights and image data sets cannot be downloaded here, so clip-erasure ships its
own small world: coloured shapes of two sizes on noisy tinted backgrounds, each with a caption.
It is written as PNG files plus a ``manifest.jsonl`` in the same format users give for their own
data (see :mod:`unlearning.data`), so every later stage reads it through the same loader.

Every image is a pure function of ``(seed, split, index)``: generating twice, or generating one
split alone, gives the same pixels.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

SHAPES = ("circle", "square", "triangle", "star", "cross", "heart", "crescent", "arrow")
# More classes for a world that needs them (WorldSpec.extra_shapes: a batch of 10 class erasures
# that still leaves classes to keep); the embedded default has the 8 above.
EXTRA_SHAPES = ("diamond", "pentagon", "ring", "bar")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 215, 40),
    "purple": (140, 50, 190),
    "orange": (245, 140, 30),
}
# Radius as a fraction of the image side.
SIZES = {"small": (0.13, 0.20), "large": (0.27, 0.38)}
# Shapes whose identity survives any rotation get a full turn; the others only tilt.
FULL_TURN = {"circle", "triangle", "star", "crescent", "arrow", "pentagon", "ring"}
SPLITS = ("train", "val", "test")

# Training captions. The evaluation prompts ("a photo of a ...") never occur here, so zero-shot
# accuracy measures generalisation to unseen phrasing rather than caption recall.
TRAIN_TEMPLATES = (
    "a {size} {colour} {shape}",
    "an image of a {size} {colour} {shape}",
    "a {shape} colored {colour}",
    "a picture of a {shape}",
    "{colour} {shape}",
    "a {size} {shape}",
    "a drawing of a {colour} {shape}",
    "this is a {size} {colour} {shape}",
)
EVAL_CAPTION = "a photo of a {size} {colour} {shape}"

SUPERSAMPLE = 4  # shapes are drawn at 4x and downsampled, which anti-aliases their edges


@dataclass(frozen=True)
class WorldSpec:
    """How much of the world to generate. Val and test are balanced over colour x shape."""

    n_train: int = 60_000
    val_per_subgroup: int = 32  # 8 shapes x 6 colours x 32 = 1,536 val images
    test_per_subgroup: int = 64  # 8 x 6 x 64 = 3,072 test images, 384 per shape
    image_size: int = 32
    seed: int = 0
    extra_shapes: tuple[str, ...] = ()  # from EXTRA_SHAPES, after the 8 of SHAPES

    def __post_init__(self):
        object.__setattr__(self, "extra_shapes", tuple(self.extra_shapes))
        unknown = [s for s in self.extra_shapes if s not in EXTRA_SHAPES]
        if unknown or len(set(self.extra_shapes)) != len(self.extra_shapes):
            raise ValueError(f"extra_shapes: {list(self.extra_shapes)} — give distinct shapes out of {list(EXTRA_SHAPES)}")

    @property
    def shapes(self) -> tuple[str, ...]:
        return SHAPES + self.extra_shapes

    def split_size(self, split: str) -> int:
        per_subgroup = {"val": self.val_per_subgroup, "test": self.test_per_subgroup}
        if split == "train":
            return self.n_train
        return per_subgroup[split] * len(self.shapes) * len(COLOURS)


def _polygon(shape: str) -> list[tuple[float, float]]:
    """Outline of a shape in unit coordinates (radius 1, y pointing down)."""
    if shape == "square":
        return [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)]
    if shape == "triangle":
        return [(math.cos(a), math.sin(a)) for a in (math.radians(d) for d in (-90, 30, 150))]
    if shape == "star":
        points = []
        for i in range(10):
            radius = 1.0 if i % 2 == 0 else 0.42
            angle = math.radians(-90 + 36 * i)
            points.append((radius * math.cos(angle), radius * math.sin(angle)))
        return points
    if shape == "cross":
        a, b = 0.3, 0.95
        return [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a),
                (-b, a), (-b, -a), (-a, -a)]
    if shape == "heart":
        ts = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        xs = 16 * np.sin(ts) ** 3 / 17
        ys = -(13 * np.cos(ts) - 5 * np.cos(2 * ts) - 2 * np.cos(3 * ts) - np.cos(4 * ts)) / 17
        return list(zip(xs.tolist(), (ys + 0.1).tolist()))
    if shape == "arrow":
        return [(-1, -0.22), (0.15, -0.22), (0.15, -0.6), (1, 0), (0.15, 0.6), (0.15, 0.22),
                (-1, 0.22)]
    if shape == "diamond":
        return [(0, -1), (0.6, 0), (0, 1), (-0.6, 0)]
    if shape == "pentagon":
        return [(math.cos(a), math.sin(a)) for a in (math.radians(-90 + 72 * i) for i in range(5))]
    if shape == "bar":
        return [(-1, -0.3), (1, -0.3), (1, 0.3), (-1, 0.3)]
    raise ValueError(f"no polygon for shape {shape!r}")


def _draw_mask(shape: str, centre: tuple[float, float], radius: float, angle: float, side: int) -> Image.Image:
    """Binary mask ('L' image) of one shape on a ``side`` x ``side`` canvas."""
    mask = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(mask)
    cx, cy = centre
    cos_a, sin_a = math.cos(angle), math.sin(angle)

    def place(points):
        return [(cx + radius * (x * cos_a - y * sin_a), cy + radius * (x * sin_a + y * cos_a)) for x, y in points]

    if shape == "circle":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=255)
    elif shape == "ring":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=255)
        inner = 0.55 * radius
        draw.ellipse([cx - inner, cy - inner, cx + inner, cy + inner], fill=0)
    elif shape == "crescent":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=255)
        (ox, oy), = place([(0.45, 0.0)])
        inner = 0.82 * radius
        draw.ellipse([ox - inner, oy - inner, ox + inner, oy + inner], fill=0)
    else:
        draw.polygon(place(_polygon(shape)), fill=255)
    return mask


def render(shape: str, colour: str, size: str, rng: np.random.Generator, image_size: int = 32) -> tuple[Image.Image, dict]:
    """Draw one shape on a noisy tinted background.

    Returns the image and the sampled attributes (position, rotation, background) for the manifest.
    """
    side = image_size * SUPERSAMPLE
    lo, hi = SIZES[size]
    radius_frac = rng.uniform(lo, hi)
    radius = radius_frac * side
    margin = radius + 1
    cx, cy = rng.uniform(margin, side - margin, size=2)
    max_tilt = math.pi if shape in FULL_TURN else math.radians(20)
    angle = rng.uniform(-max_tilt, max_tilt)

    grey = rng.uniform(60, 200)
    tint = rng.uniform(-25, 25, size=3)
    background = np.clip(grey + tint, 0, 255)
    fill = np.clip(np.array(COLOURS[colour]) + rng.uniform(-20, 20, size=3), 0, 255)

    mask = np.asarray(_draw_mask(shape, (cx, cy), radius, angle, side), dtype=np.float32)[..., None] / 255.0
    canvas = background * (1 - mask) + fill * mask
    small = Image.fromarray(canvas.astype(np.uint8)).resize((image_size, image_size), Image.BOX)

    noise_sigma = rng.uniform(5, 25)
    pixels = np.asarray(small, dtype=np.float32) + rng.normal(0, noise_sigma, size=(image_size, image_size, 3))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    attributes = {
        "shape": shape,
        "colour": colour,
        "size": size,
        "x": round(cx / side, 3),
        "y": round(cy / side, 3),
        "rotation_deg": round(math.degrees(angle), 1),
        "background": int(grey),
        "noise": round(float(noise_sigma), 1),
    }
    return image, attributes


def sample_record(spec: WorldSpec, split: str, index: int) -> tuple[Image.Image, dict]:
    """The ``index``-th image of ``split``: its pixels, attributes and caption, from the seed alone."""
    rng = np.random.default_rng([spec.seed, SPLITS.index(split), index])
    shapes = spec.shapes
    if split == "train":
        shape = shapes[rng.integers(len(shapes))]
        colour = list(COLOURS)[rng.integers(len(COLOURS))]
    else:  # balanced: cycle through every colour x shape subgroup
        subgroup = index % (len(shapes) * len(COLOURS))
        shape, colour = shapes[subgroup % len(shapes)], list(COLOURS)[subgroup // len(shapes)]
    size = list(SIZES)[rng.integers(len(SIZES))]
    image, attributes = render(shape, colour, size, rng, spec.image_size)
    template = TRAIN_TEMPLATES[rng.integers(len(TRAIN_TEMPLATES))] if split == "train" else EVAL_CAPTION
    caption = template.format(size=size, colour=colour, shape=shape)
    return image, {"label": shape, "attributes": attributes, "caption": caption, "split": split}


def _write_chunk(root: Path, spec: WorldSpec, split: str, start: int, stop: int) -> list[dict]:
    rows = []
    for index in range(start, stop):
        image, record = sample_record(spec, split, index)
        relative = f"images/{split}/{index:06d}.png"
        image.save(root / relative, compress_level=1)
        rows.append({"image_path": relative, **record})
    return rows


def generate_world(root: str | Path, spec: WorldSpec = WorldSpec(), progress: bool = True, workers: int | None = None,
                   chunk: int = 2000) -> Path:
    """Write the world to ``root``: ``images/<split>/<index>.png`` and ``manifest.jsonl``.

    Skips the work when ``root`` already holds a complete world of the same spec. Images are
    pure functions of their index, so ``workers`` processes (default: one per core) write the
    same files and manifest as one would.

    Returns:
        The manifest path.
    """
    root = Path(root)
    manifest_path = root / "manifest.jsonl"
    spec_path = root / "world_spec.json"
    # as JSON both sides (tuples become lists); a spec written before extra_shapes existed had none
    if manifest_path.exists() and spec_path.exists() and \
            {"extra_shapes": [], **json.loads(spec_path.read_text())} == json.loads(json.dumps(asdict(spec))):
        return manifest_path

    root.mkdir(parents=True, exist_ok=True)
    jobs = []
    for split in SPLITS:
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        size = spec.split_size(split)
        jobs += [(split, start, min(start + chunk, size)) for start in range(0, size, chunk)]
    workers = min(workers or os.cpu_count() or 1, len(jobs))
    rows = []
    with tqdm(total=sum(spec.split_size(s) for s in SPLITS), desc="shapes world", unit="img", disable=not progress) as bar:
        if workers <= 1:
            for job in jobs:
                rows += _write_chunk(root, spec, *job)
                bar.update(job[2] - job[1])
        else:
            # spawn, not fork: the parent may hold OpenMP/torch threads that a forked child inherits broken
            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
                for job, chunk_rows in zip(jobs, pool.map(_write_chunk, *zip(*[(root, spec, *job) for job in jobs]))):
                    rows += chunk_rows
                    bar.update(job[2] - job[1])
    tmp = manifest_path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
    tmp.replace(manifest_path)  # the manifest appears only once every image is on disk
    spec_path.write_text(json.dumps(asdict(spec)))
    return manifest_path


SHAPE_TEMPLATES = ("a photo of a {}.",)


def probe_tasks(shapes: Sequence[str] = SHAPES) -> dict[str, "ZeroShotTask"]:
    """The world's zero-shot tasks: shape (the main task) and the held-out probes.

    Colour alone saturates near 100 % and separates nothing, so size and colour x shape probes
    carry the "general ability must not drop" checks. Pass ``shapes`` to restrict the probes to
    retained shapes.
    """
    from unlearning.data import ZeroShotTask, attribute_task, class_task

    shapes = list(shapes)
    return {
        "shape": class_task(shapes, SHAPE_TEMPLATES, name="shape"),
        "colour": attribute_task("colour", list(COLOURS), "a photo of a {} object."),
        "size": attribute_task("size", list(SIZES), "a photo of a {} shape."),
        "colour_shape": ZeroShotTask(
            "colour_shape",
            [f"{c} {s}" for c in COLOURS for s in shapes],
            ["a photo of a {}."],
            lambda r: f"{r.attributes['colour']} {r.label}",
        ),
    }


def world_probes(shapes: Sequence[str]) -> dict[str, "ZeroShotTask"]:
    """The held-out probes over ``shapes`` (the shape task itself is the evaluation's class task)."""
    return {k: v for k, v in probe_tasks(shapes).items() if k != "shape"}
