"""Decoded images cached on disk, so a repeat request does not decode the same files again.

A set of records loads to one ``N x 3 x S x S`` uint8 tensor (:func:`unlearning.data.load_images`);
the cache stores it as a safetensors file named by a key over what the tensor is made of: the
image size, a loader version and, in order, a content hash (BLAKE2b) of each image file's bytes.
Paths are not part of the key: the same bytes decode to the same pixels wherever they lie.

Why full content hashes, not file stats: only the images a request loads are hashed (about 5k of
the small test world, 9k of a 60k-image world: forget, retain and stop samples and the test
split), and hashing a small PNG costs ~10-20 us, far less than decoding it. That is ~0.1-0.2 s
on a repeat, so the cheaper size/mtime key, which misses a rewrite that restores the mtime, would
buy little. Threads do not help: the files are small and hashing them holds the GIL.

Files are written atomically (a temporary file, then a rename); a file that does not read back
as the tensor its key names (truncated, corrupt, of another shape) is recomputed and rewritten.
The folder is bounded: after each write only the most recently used ``max_files`` files, within
``max_bytes`` in all, are kept (a hit refreshes a file's mtime).
"""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from pathlib import Path
from typing import Iterable, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from unlearning.data import Record, load_images

# Part of every key: bump when load_image's decoding (resize, crop, mode mapping) changes.
LOADER_VERSION = "load_image-1"
DEFAULT_MAX_FILES = 64
DEFAULT_MAX_BYTES = 4 * 2**30
STALE_TMP_S = 3600  # a temporary file this old was left by a writer that died
_SUFFIX = ".safetensors"


def file_digest(path: str | os.PathLike) -> bytes:
    """BLAKE2b-128 of a file's bytes. Raises OSError when it cannot be read."""
    with open(path, "rb") as handle:
        return hashlib.blake2b(handle.read(), digest_size=16).digest()


def images_key(paths: Iterable[str | os.PathLike], image_size: int) -> str:
    """The cache key of these image files, in this order, decoded at ``image_size``.

    Raises:
        OSError: an image cannot be read (load_images then names it).
    """
    key = hashlib.blake2b(f"{LOADER_VERSION}|{int(image_size)}|".encode(), digest_size=20)
    for path in paths:
        key.update(file_digest(path))
    return key.hexdigest()


class ImageCache:
    """A folder of decoded image tensors; counts its hits and misses.

    Args:
        folder: where the ``.safetensors`` files live (created on first write).
        max_files: most files kept.
        max_bytes: most bytes kept in all (a single larger tensor is still cached, alone).
    """

    def __init__(self, folder: str | os.PathLike, max_files: int = DEFAULT_MAX_FILES, max_bytes: int = DEFAULT_MAX_BYTES):
        if max_files < 1 or max_bytes < 1:
            raise ValueError(f"ImageCache: max_files ({max_files}) and max_bytes ({max_bytes}) must be at least 1")
        self.folder = Path(folder)
        self.max_files, self.max_bytes = max_files, max_bytes
        self.hits = self.misses = 0

    @property
    def outcome(self) -> str:
        """"hit" (every load came from the cache), "miss" (none did), "partial", or "unused"."""
        if not self.hits and not self.misses:
            return "unused"
        return "hit" if not self.misses else "miss" if not self.hits else "partial"

    def load(self, records: Sequence[Record], image_size: int) -> torch.Tensor:
        """As :func:`unlearning.data.load_images`, from the cache when the same bytes were decoded before."""
        if not records:
            return load_images(records, image_size)
        try:
            key = images_key((r.image_path for r in records), image_size)
        except OSError:
            return load_images(records, image_size)  # raises, naming the file it cannot read
        path = self.folder / f"{key}{_SUFFIX}"
        images = self._read(path, key, (len(records), 3, image_size, image_size))
        if images is not None:
            self.hits += 1
            return images
        self.misses += 1
        images = load_images(records, image_size)
        self._write(path, key, images)
        return images

    def _read(self, path: Path, key: str, shape: tuple[int, ...]) -> torch.Tensor | None:
        """The tensor stored under ``key``, or None when absent or not that tensor (then recomputed)."""
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as handle:
                if (handle.metadata() or {}).get("key") != key:
                    return None
                images = handle.get_tensor("images")
        except Exception:  # safetensors raises its own error types for truncated or garbled files
            return None
        if images.dtype != torch.uint8 or tuple(images.shape) != shape:
            return None
        try:
            os.utime(path)  # most recently used: pruned last
        except OSError:
            pass
        return images

    def _write(self, path: Path, key: str, images: torch.Tensor) -> None:
        """Store atomically, then prune; a cache that cannot be written is skipped, not fatal."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
            try:
                save_file({"images": images.contiguous()}, str(tmp), metadata={"key": key, "loader": LOADER_VERSION})
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
            self.prune(keep=path)
        except OSError:
            pass

    def prune(self, keep: Path | None = None) -> None:
        """Delete the least recently used files beyond ``max_files`` or ``max_bytes``, and stale temporary files."""
        entries = []
        now = time.time()
        for entry in os.scandir(self.folder):
            try:
                stat = entry.stat()
            except OSError:
                continue
            if entry.name.endswith(".tmp"):
                if now - stat.st_mtime > STALE_TMP_S:
                    Path(entry.path).unlink(missing_ok=True)
            elif entry.name.endswith(_SUFFIX):
                entries.append((Path(entry.path) != keep, -stat.st_mtime, stat.st_size, Path(entry.path)))
        total = 0
        for count, (_, _, size, path) in enumerate(sorted(entries), start=1):
            total += size
            if path != keep and (count > self.max_files or total > self.max_bytes):
                path.unlink(missing_ok=True)
                total -= size


def cached_load_images(records: Sequence[Record], image_size: int,
                       cache_dir: str | os.PathLike | ImageCache | None = None) -> torch.Tensor:
    """:func:`unlearning.data.load_images`, cached when ``cache_dir`` is given.

    Args:
        cache_dir: None: no cache; a folder; or an :class:`ImageCache` (which counts hits and misses).
    """
    if cache_dir is None:
        return load_images(records, image_size)
    cache = cache_dir if isinstance(cache_dir, ImageCache) else ImageCache(cache_dir)
    return cache.load(records, image_size)
