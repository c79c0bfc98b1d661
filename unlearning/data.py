"""Manifests, images and zero-shot tasks: the one loader for the shapes world and users' data.

A manifest is a JSON-lines (or CSV) file, one image per row:

    {"image_path": "images/test/000001.png", "label": "circle", "caption": "a photo of a ...",
     "split": "test", "attributes": {"colour": "red", "size": "small", ...}}

``image_path`` is relative to the manifest's folder (or absolute). ``attributes`` is optional;
in CSV, columns other than the four above become attributes.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from PIL import Image

REQUIRED_COLUMNS = ("image_path", "label", "caption")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
# Pillow modes that load_image maps to RGB faithfully ("I" and "F" have no fixed range).
LOADABLE_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", *SIXTEEN_BIT_MODES)


@dataclass(frozen=True)
class Record:
    """One manifest row. ``image_path`` is absolute once read."""

    image_path: str
    label: str
    caption: str
    split: str = ""
    attributes: dict = field(default_factory=dict, hash=False, compare=False)

    def attribute(self, name: str) -> str:
        return self.label if name in ("label", "shape") and name not in self.attributes else str(self.attributes[name])


def read_manifest(path: str | Path, split: str | None = None) -> list[Record]:
    """Read a ``.jsonl``/``.json`` or ``.csv`` manifest; relative image paths resolve against its folder."""
    path = Path(path)
    root = path.parent.resolve()
    if path.suffix == ".csv":
        with path.open(newline="") as handle:
            raw = [dict(row) for row in csv.DictReader(handle)]
        rows = []
        for row in raw:
            attributes = {k: v for k, v in row.items() if k not in (*REQUIRED_COLUMNS, "split")}
            rows.append({**{k: row.get(k) for k in (*REQUIRED_COLUMNS, "split")}, "attributes": attributes})
    else:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    records, root_text = [], str(root)
    for number, row in enumerate(rows, start=1):
        missing = [c for c in REQUIRED_COLUMNS if not row.get(c)]
        if missing:
            raise ValueError(f"{path}: row {number} lacks {', '.join(missing)}; every row needs {', '.join(REQUIRED_COLUMNS)}")
        records.append(
            Record(
                image_path=_joined(root_text, str(row["image_path"])),
                label=str(row["label"]),
                caption=str(row["caption"]),
                split=str(row.get("split") or ""),
                attributes=dict(row.get("attributes") or {}),
            )
        )
    return [r for r in records if split is None or r.split == split]


def _joined(root: str, image_path: str) -> str:
    """``str(root / image_path)`` as pathlib makes it (absolute paths kept, "." parts and repeated
    slashes dropped), by string joining for plain relative paths: pathlib costs ~10 us a row."""
    plain = image_path and image_path != "." and not image_path.startswith(("/", "./")) and not image_path.endswith(("/", "/.")) \
        and "//" not in image_path and "/./" not in image_path
    if not plain:
        path = Path(image_path)
        return str(path if path.is_absolute() else Path(root) / path)
    return f"{root.rstrip('/')}/{image_path}"


def write_manifest(records: Iterable[Record], path: str | Path) -> Path:
    """Write records as JSON lines, image paths relative to the manifest's folder where possible."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    root = path.parent.resolve()
    lines = []
    for r in records:
        image_path = Path(r.image_path)
        try:
            image_path = image_path.resolve().relative_to(root)
        except ValueError:
            pass
        row = {"image_path": str(image_path), "label": r.label, "caption": r.caption, "split": r.split,
               "attributes": r.attributes}
        lines.append(json.dumps(row) + "\n")
    path.write_text("".join(lines))
    return path


def _to_rgb(image: Image.Image, path: str | Path) -> Image.Image:
    """RGB of an opened image; 16-bit greyscale is rescaled to 8 bits first, because
    ``convert("RGB")`` clips its values at 255 (a 16-bit scan would turn almost white)."""
    if image.mode in SIXTEEN_BIT_MODES:
        levels = np.asarray(image).astype(np.uint32)
        return Image.fromarray(((levels * 255 + 32767) // 65535).astype(np.uint8), "L").convert("RGB")
    if image.mode not in LOADABLE_MODES:
        raise ValueError(f"{path}: pixel mode {image.mode!r} has no known range to map to 8-bit RGB; "
                         "save the image as 8-bit RGB (or 16-bit greyscale) PNG or JPEG")
    return image.convert("RGB")


def load_image(path: str | Path, image_size: int) -> np.ndarray:
    """Decode one image to an ``image_size`` square RGB uint8 array (shortest-side resize, centre crop).

    16-bit greyscale is scaled to 8 bits (65535 -> 255); modes without a known range ("I", "F")
    raise ValueError. Of a multi-frame file only the first frame is read (validation refuses those).
    """
    with Image.open(path) as image:
        image = _to_rgb(image, path)
        if image.size != (image_size, image_size):
            scale = image_size / min(image.size)
            resized = (max(image_size, round(image.width * scale)), max(image_size, round(image.height * scale)))
            image = image.resize(resized, Image.BICUBIC)
            left, top = (image.width - image_size) // 2, (image.height - image_size) // 2
            image = image.crop((left, top, left + image_size, top + image_size))
        return np.asarray(image, dtype=np.uint8)


def load_images(records: Sequence[Record], image_size: int) -> torch.Tensor:
    """Decode records' images into one ``N x 3 x S x S`` uint8 tensor (kept uint8 to save memory)."""
    if not records:
        return torch.empty(0, 3, image_size, image_size, dtype=torch.uint8)
    array = np.stack([load_image(r.image_path, image_size) for r in records])
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


def normalize(images: torch.Tensor, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> torch.Tensor:
    """uint8 ``N x 3 x H x W`` (or floats in [0, 1]) to the model's normalised float input."""
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    mean_t = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean_t) / std_t


def denormalize(x: torch.Tensor, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> torch.Tensor:
    """Model input back to [0, 1] floats, for image grids."""
    mean_t = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * std_t + mean_t).clamp(0, 1)


@dataclass
class ZeroShotTask:
    """A zero-shot classification probe: class names, prompt templates and each record's label.

    ``label_of`` maps a record to its class name; records whose class is not in ``classnames``
    are left out of the task.
    """

    name: str
    classnames: list[str]
    templates: list[str]
    label_of: Callable[[Record], str]

    def targets(self, records: Sequence[Record]) -> tuple[list[int], torch.Tensor]:
        """Indices of the records in this task and their class indices."""
        index = {c: i for i, c in enumerate(self.classnames)}
        keep, labels = [], []
        for i, r in enumerate(records):
            try:
                name = self.label_of(r)
            except KeyError:
                continue
            if name in index:
                keep.append(i)
                labels.append(index[name])
        return keep, torch.tensor(labels, dtype=torch.long)


def class_task(classnames: Sequence[str], templates: Sequence[str] = ("a photo of a {}.",), name: str = "class") -> ZeroShotTask:
    """The main task: classify each record's ``label``."""
    return ZeroShotTask(name, list(classnames), list(templates), lambda r: r.label)


def attribute_task(name: str, values: Sequence[str], template: str) -> ZeroShotTask:
    """Classify one attribute (e.g. colour) with a single template."""
    return ZeroShotTask(name, list(values), [template], lambda r: str(r.attributes[name]))


def pair_task(first: str, values_first: Sequence[str], values_label: Sequence[str], template: str = "a photo of a {}.",
              name: str | None = None) -> ZeroShotTask:
    """Classify "attribute label" pairs, e.g. "red circle" over every colour x shape."""
    classnames = [f"{a} {b}" for a in values_first for b in values_label]
    return ZeroShotTask(name or f"{first}_{'label'}", classnames, [template], lambda r: f"{r.attributes[first]} {r.label}")
