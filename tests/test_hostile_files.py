"""Files that decode but would be read wrongly: each is refused by the check named after it, with
the row and the limit in the message; 16-bit greyscale is read right instead (rescaled, not clipped)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tasks.validation import LOADABLE_MODES, MAX_CAPTION_CHARS, DataValidationError, validate_manifest_file
from unlearning.data import LOADABLE_MODES as LOADER_MODES
from unlearning.data import load_image
from unlearning.world import SHAPES

CLASSES = list(SHAPES)


def _manifest(root: Path, images: dict[str, Image.Image | bytes], **row) -> Path:
    """A forget manifest with one circle row per image (written under ``root/images``)."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for name, image in images.items():
        path = root / "images" / name
        if isinstance(image, bytes):
            path.write_bytes(image)
        else:
            image.save(path, **({"save_all": True, "append_images": image.info["frames"]} if "frames" in image.info else {}))
        rows.append({"image_path": f"images/{name}", "label": "circle", "caption": "a red circle", **row})
    manifest = root / "forget.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest


def _rgb(colour: str = "red") -> Image.Image:
    return Image.new("RGB", (16, 16), colour)


def _frames(n: int) -> Image.Image:
    first = _rgb("red")
    first.info["frames"] = [_rgb("blue") for _ in range(n - 1)]  # read by _manifest: saved as one multi-frame file
    return first


def _png_bytes() -> bytes:
    buffer = io.BytesIO()
    _rgb().save(buffer, format="PNG")
    return buffer.getvalue()


def _sixteen_bit(level: int) -> Image.Image:
    return Image.fromarray(np.full((16, 16), level, dtype=np.uint16))


@pytest.mark.parametrize("images, row, check, shown", [
    ({"long.png": _rgb()}, {"caption": "a" * 100_000}, "caption_length", "images/long.png (100,000 characters, row 1)"),
    ({"animated.gif": _frames(3)}, {}, "image_single_frame", "images/animated.gif (row 1)"),
    ({"pages.tif": _frames(2)}, {}, "image_single_frame", "images/pages.tif (row 1)"),
    ({"disguised.jpg": _png_bytes()}, {}, "image_format_matches_name", "images/disguised.jpg (PNG content, row 1)"),
    ({"no_extension": _png_bytes()}, {}, "image_format_matches_name", "images/no_extension (PNG content, row 1)"),
    ({"wide.tif": Image.fromarray(np.full((16, 16), 70_000, dtype=np.int32), "I")}, {}, "image_mode_loadable",
     "images/wide.tif (mode I, row 1)"),
    ({"float.tif": Image.fromarray(np.zeros((16, 16), dtype=np.float32), "F")}, {}, "image_mode_loadable",
     "images/float.tif (mode F, row 1)"),
], ids=["caption_100k", "animated_gif", "multipage_tiff", "png_named_jpg", "png_without_extension", "int32_tiff", "float_tiff"])
def test_hostile_file_fails_only_its_check_naming_row_and_limit(tmp_path, images, row, check, shown):
    manifest = _manifest(tmp_path, images, **row)
    report = validate_manifest_file(manifest, "forget", CLASSES)
    assert {r.expectation for r in report.failures} == {check}
    with pytest.raises(DataValidationError) as caught:
        report.raise_for_failure()
    message = str(caught.value)
    assert f"check {check} failed for 1 row (e.g. {shown})" in message and "\n" not in message
    assert len(message) < 600  # a 100,000-character caption is counted, never quoted


def test_caption_limit_is_named_and_the_limit_itself_passes(tmp_path):
    at_limit = validate_manifest_file(_manifest(tmp_path / "ok", {"a.png": _rgb()}, caption="a" * MAX_CAPTION_CHARS), "forget", CLASSES)
    assert at_limit.success, at_limit.message()
    over = validate_manifest_file(_manifest(tmp_path / "over", {"a.png": _rgb()}, caption="a" * (MAX_CAPTION_CHARS + 1)), "forget", CLASSES)
    assert f"at most {MAX_CAPTION_CHARS:,} characters" in over.message()


def test_long_labels_are_quoted_shortened(tmp_path):
    report = validate_manifest_file(_manifest(tmp_path, {"a.png": _rgb()}, label="x" * 5000), "forget", CLASSES)
    assert [r.expectation for r in report.failures] == ["label_known"]
    assert len(report.message()) < 600 and '..." (row 1)' in report.message()


def test_ordinary_formats_pass(tmp_path):
    images = {"a.png": _rgb(), "b.jpeg": _rgb("blue"), "c.jpg": _rgb("green"), "d.gif": _rgb("red").convert("P"),
              "e.tiff": _rgb(), "grey16.png": _sixteen_bit(30_000), "grey.png": _rgb().convert("L")}
    report = validate_manifest_file(_manifest(tmp_path, images), "forget", CLASSES)
    assert report.success, report.message()


def test_sixteen_bit_greyscale_is_rescaled_not_clipped(tmp_path):
    # convert("RGB") clips 16-bit levels at 255: every level from 255/65535 up would read as white.
    path = tmp_path / "grey16.png"
    levels = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
    Image.fromarray(levels).save(path)
    assert Image.open(path).mode == "I;16"
    loaded = load_image(path, 32)
    expected = np.round(levels / 257).astype(np.uint8)
    assert np.abs(loaded[..., 0].astype(int) - expected).max() <= 1
    assert (loaded[..., 0] == loaded[..., 2]).all()
    assert loaded.mean() == pytest.approx(127.5, abs=2)  # clipped, it would be about 254


def test_loader_refuses_modes_without_a_known_range(tmp_path):
    path = tmp_path / "wide.tif"
    Image.fromarray(np.full((16, 16), 70_000, dtype=np.int32), "I").save(path)
    with pytest.raises(ValueError, match="pixel mode 'I'"):
        load_image(path, 16)


def test_loadable_modes_match_the_loader():
    assert LOADABLE_MODES == LOADER_MODES
