"""Decoded images and parsed manifests cached on disk, so a later request redoes neither for unchanged files.

Images: each image's decoded pixels (``3 x S x S`` uint8, as :func:`unlearning.data.load_images`
makes them) are found by a content hash (BLAKE2b-128) of its file's bytes at image size ``S``.
Any set of images decoded before is a hit, in any order, whatever manifest or path lists them:
a request for another target, whose forget, retain and stop samples differ, decodes only the
images no earlier request loaded. The pixels are packed in a few safetensors shards per image
size (``images``: ``N x 3 x S x S`` uint8; ``digests``: ``N x 16`` uint8, row by row), each
written once under a new name and never changed; a load appends one shard of its misses, and
many small shards are merged into larger ones.

Why content hashes, not file stats: hashing a small PNG costs ~10-20 us, far less than decoding
it (~0.1-0.2 s for the ~9k images a request on a 60k-image world loads), and the cheaper
size/mtime key misses a rewrite that restores the mtime.

Manifests: :func:`cached_read_manifest` keeps :func:`unlearning.data.read_manifest`'s records as
column-wise JSON keyed by the manifest's SHA-256 and folder; parsing 60k JSON lines row by row
costs ~1 s, reading the columns back ~0.2 s.

Files are written atomically (a temporary file, then a rename). A shard that does not read back
as what its name and header say (truncated, garbled, other shapes) is deleted and its images are
decoded again; damage inside the pixel bytes is not detected. Each folder is bounded: after a
write only the most recently used files (a hit refreshes a file's mtime), within ``max_files``
and ``max_bytes``, are kept.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
import re
import time
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Iterable, Sequence

import pydantic_core
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from unlearning.data import Record, load_images, read_manifest

# Part of every shard's name and header: bump when load_image's decoding (resize, crop, mode mapping) changes.
LOADER_VERSION = "load_image-1"
DEFAULT_MAX_FILES = 64
DEFAULT_MAX_BYTES = 4 * 2**30
SHARD_BYTES = 64 * 2**20  # pixel bytes a shard is written with at most (one image more when a single image is larger)
COMPACT_AT = 8  # this many shards of one size tier (a power of 4 bytes) below SHARD_BYTES / 2: merge them
MEMO_BYTES = 512 * 2**20  # shards one ImageCache keeps in memory, so the loads of one request read each shard once
STALE_TMP_S = 3600  # a temporary file this old was left by a writer that died
DIGEST_BYTES = 16
_SUFFIX = ".safetensors"
MANIFEST_CACHE_VERSION = "1"  # bump when read_manifest's records change
MANIFEST_CACHE_FILES = 8


def file_digest(path: str | os.PathLike) -> bytes:
    """BLAKE2b-128 of a file's bytes. Raises OSError when it cannot be read."""
    with open(path, "rb") as handle:
        return hashlib.blake2b(handle.read(), digest_size=DIGEST_BYTES).digest()


class ImageCache:
    """A folder of decoded images found by their files' content; counts the images it served and decoded.

    Args:
        folder: where the shards live (created on first write).
        max_files: most files kept.
        max_bytes: most bytes kept in all (the shards just written are kept even if larger).
        shard_bytes: pixel bytes a shard is written with at most.
    """

    def __init__(self, folder: str | os.PathLike, max_files: int = DEFAULT_MAX_FILES, max_bytes: int = DEFAULT_MAX_BYTES,
                 shard_bytes: int = SHARD_BYTES):
        if max_files < 1 or max_bytes < 1 or shard_bytes < 1:
            raise ValueError(f"ImageCache: max_files ({max_files}), max_bytes ({max_bytes}) and shard_bytes ({shard_bytes}) "
                             "must be at least 1")
        self.folder = Path(folder)
        self.max_files, self.max_bytes, self.shard_bytes = max_files, max_bytes, shard_bytes
        self.hits = self.misses = 0  # images served from the cache, images decoded
        self._digests: dict[Path, dict[bytes, int] | None] = {}  # shard -> digest -> row (None: unreadable)
        self._memo: OrderedDict[Path, torch.Tensor] = OrderedDict()
        self._touched: set[Path] = set()

    @property
    def outcome(self) -> str:
        """"hit" (every image came from the cache), "miss" (none did), "partial", or "unused"."""
        if not self.hits and not self.misses:
            return "unused"
        return "hit" if not self.misses else "miss" if not self.hits else "partial"

    def load(self, records: Sequence[Record], image_size: int) -> torch.Tensor:
        """As :func:`unlearning.data.load_images`; images whose bytes were decoded before come from the cache."""
        if not records:
            return load_images(records, image_size)
        try:
            digests = [file_digest(r.image_path) for r in records]
        except OSError:
            return load_images(records, image_size)  # raises, naming the file it cannot read
        images = torch.empty(len(records), 3, image_size, image_size, dtype=torch.uint8)
        wanted: dict[bytes, list[int]] = {}
        for position, digest in enumerate(digests):
            wanted.setdefault(digest, []).append(position)
        found = self._gather(wanted, image_size, images)
        missing = [digest for digest in wanted if digest not in found]
        if missing:
            decoded = load_images([records[wanted[d][0]] for d in missing], image_size)
            positions = [p for d in missing for p in wanted[d]]
            images[positions] = decoded[[row for row, d in enumerate(missing) for _ in wanted[d]]]
            self._write(missing, decoded, image_size)
        self.hits += sum(len(wanted[d]) for d in found)
        self.misses += sum(len(wanted[d]) for d in missing)
        return images

    def shards(self, image_size: int) -> list[Path]:
        """This loader's shards of images at ``image_size``, oldest first."""
        if not self.folder.is_dir():
            return []
        return sorted(self.folder.glob(f"{_shard_prefix(image_size)}*{_SUFFIX}"), key=_mtime)

    def _gather(self, wanted: dict[bytes, list[int]], image_size: int, out: torch.Tensor) -> set[bytes]:
        """Copy every cached image of ``wanted`` (digest -> positions) into ``out``; the digests found."""
        rows_by_shard: dict[Path, list[tuple[int, bytes]]] = {}
        pending = set(wanted)
        for shard in self.shards(image_size):
            index = self._index(shard, image_size)
            if not index or not pending:
                continue
            for digest in [d for d in pending if d in index]:
                rows_by_shard.setdefault(shard, []).append((index[digest], digest))
                pending.discard(digest)
        found: set[bytes] = set()
        for shard, rows in rows_by_shard.items():
            pixels = self._pixels(shard, image_size)
            if pixels is None:
                continue  # vanished or damaged since indexed: decoded again below
            positions = [p for _, digest in rows for p in wanted[digest]]
            sources = [row for row, digest in rows for _ in wanted[digest]]
            out[positions] = pixels[sources]
            found.update(digest for _, digest in rows)
            if shard not in self._touched:
                self._touched.add(shard)
                try:
                    os.utime(shard)  # most recently used: pruned last
                except OSError:
                    pass
        return found

    def _index(self, shard: Path, image_size: int) -> dict[bytes, int] | None:
        """A shard's digest -> row, read once per shard (shards never change); None when unreadable (then deleted)."""
        if shard in self._digests:
            return self._digests[shard]
        index = None
        try:
            with safe_open(str(shard), framework="pt") as handle:
                metadata = handle.metadata() or {}
                digests = handle.get_tensor("digests")
                shape = tuple(handle.get_slice("images").get_shape())
            rows = digests.shape[0] if digests.dim() == 2 else -1
            if (metadata.get("loader") == LOADER_VERSION and metadata.get("image_size") == str(image_size)
                    and digests.dtype == torch.uint8 and tuple(digests.shape) == (rows, DIGEST_BYTES)
                    and shape == (rows, 3, image_size, image_size)):
                flat = digests.numpy().tobytes()
                index = {flat[i * DIGEST_BYTES:(i + 1) * DIGEST_BYTES]: i for i in range(rows)}
        except FileNotFoundError:
            return None  # pruned or merged by another process: not damage
        except Exception:  # safetensors raises its own error types for truncated or garbled files
            index = None
        if index is None:
            shard.unlink(missing_ok=True)
        self._digests[shard] = index
        return index

    def _pixels(self, shard: Path, image_size: int) -> torch.Tensor | None:
        """A shard's images, from memory when this cache read them before; None when unreadable."""
        if shard in self._memo:
            self._memo.move_to_end(shard)
            return self._memo[shard]
        try:
            with safe_open(str(shard), framework="pt") as handle:
                pixels = handle.get_tensor("images")
        except FileNotFoundError:
            self._digests[shard] = None
            return None
        except Exception:
            pixels = None
        index = self._digests.get(shard) or {}
        if pixels is None or pixels.dtype != torch.uint8 or tuple(pixels.shape) != (len(index), 3, image_size, image_size):
            self._digests[shard] = None
            shard.unlink(missing_ok=True)
            return None
        self._memo[shard] = pixels
        while sum(p.numel() for p in self._memo.values()) > MEMO_BYTES and len(self._memo) > 1:
            self._memo.popitem(last=False)
        return pixels

    def _write(self, digests: list[bytes], images: torch.Tensor, image_size: int) -> None:
        """Store these images in new shards, merge small shards when many, then prune; a cache that
        cannot be written is skipped, not fatal."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            written = self._write_shards(digests, images, image_size)
            merged, removed = self._compact(image_size)
            self.prune(keep=[*(p for p in written if p not in removed), *merged])
        except OSError:
            pass

    def _write_shards(self, digests: list[bytes], images: torch.Tensor, image_size: int) -> list[Path]:
        per_shard = max(1, self.shard_bytes // (3 * image_size * image_size))
        written = []
        for start in range(0, len(digests), per_shard):
            chunk = digests[start:start + per_shard]
            path = self.folder / f"{_shard_prefix(image_size)}{uuid.uuid4().hex}{_SUFFIX}"
            tmp = path.with_name(f".{path.name}.tmp")
            table = torch.frombuffer(bytearray(b"".join(chunk)), dtype=torch.uint8).view(len(chunk), DIGEST_BYTES)
            try:
                save_file({"images": images[start:start + per_shard].contiguous(), "digests": table}, str(tmp),
                          metadata={"loader": LOADER_VERSION, "image_size": str(image_size)})
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
            self._digests[path] = {d: i for i, d in enumerate(chunk)}
            written.append(path)
        return written

    def _compact(self, image_size: int) -> tuple[list[Path], set[Path]]:
        """Merge shards of a similar size (one power of 4 in bytes) once COMPACT_AT of them pile up.

        Each request appends small shards; merging like sizes keeps the shards few while an image
        is rewritten only a few times over its life (as in size-tiered compaction).

        Returns:
            (the shards written, the shards merged into them and deleted).
        """
        tiers: dict[int, list[Path]] = {}
        for shard in self.shards(image_size):
            size = _size(shard)
            if 0 < size < self.shard_bytes // 2:
                tiers.setdefault(size.bit_length() // 2, []).append(shard)
        small = next((shards for _, shards in sorted(tiers.items()) if len(shards) >= COMPACT_AT), None)
        if small is None:
            return [], set()
        digests, parts, merged_from = [], [], set()
        seen: set[bytes] = set()
        for shard in small:
            index = self._index(shard, image_size)
            pixels = self._pixels(shard, image_size) if index else None
            if pixels is None:
                continue
            rows = [(row, d) for row, d in enumerate(index) if d not in seen]  # an index lists its digests in row order
            seen.update(d for _, d in rows)
            digests += [d for _, d in rows]
            parts.append(pixels[[row for row, _ in rows]])
            merged_from.add(shard)
        if not digests:
            return [], set()
        merged = self._write_shards(digests, torch.cat(parts), image_size)
        for shard in merged_from:  # their images are in the merged shards now
            shard.unlink(missing_ok=True)
            self._digests.pop(shard, None)
            self._memo.pop(shard, None)
        return merged, merged_from

    def forget(self, digests: Iterable[bytes]) -> int:
        """Remove the images of these file digests from every shard, at every image size: a decoded
        copy of erased data must not outlive the erasure. A shard holding one is rewritten without
        it (the other images stay cached). Returns how many cached images were removed."""
        gone = set(digests)
        if not gone or not self.folder.is_dir():
            return 0
        removed = 0
        for shard in sorted(self.folder.glob(f"images-*{_SUFFIX}")):
            size = re.match(r"images-(\d+)px-", shard.name)
            index = self._index(shard, int(size.group(1))) if size else None  # another loader's shard: deleted
            if index is None:
                shard.unlink(missing_ok=True)
                continue
            if gone.isdisjoint(index):
                continue
            pixels = self._pixels(shard, int(size.group(1)))
            kept = [(row, digest) for digest, row in index.items() if digest not in gone]
            removed += len(index) - len(kept)
            if kept and pixels is not None:
                self._write_shards([d for _, d in kept], pixels[[row for row, _ in kept]], int(size.group(1)))
            shard.unlink(missing_ok=True)
            self._digests.pop(shard, None)
            self._memo.pop(shard, None)
        return removed

    def prune(self, keep: Sequence[Path] = ()) -> None:
        """Delete the least recently used files beyond ``max_files`` or ``max_bytes``, and stale temporary files."""
        entries = []
        now = time.time()
        kept = set(keep)
        for entry in os.scandir(self.folder):
            try:
                stat = entry.stat()
            except OSError:
                continue
            if entry.name.endswith(".tmp"):
                if now - stat.st_mtime > STALE_TMP_S:
                    Path(entry.path).unlink(missing_ok=True)
            elif entry.name.endswith(_SUFFIX):
                entries.append((Path(entry.path) not in kept, -stat.st_mtime, stat.st_size, Path(entry.path)))
        total = 0
        for count, (_, _, size, path) in enumerate(sorted(entries), start=1):
            total += size
            if path not in kept and (count > self.max_files or total > self.max_bytes):
                path.unlink(missing_ok=True)
                self._digests.pop(path, None)
                self._memo.pop(path, None)
                total -= size


def _shard_prefix(image_size: int) -> str:
    return f"images-{int(image_size)}px-{LOADER_VERSION}-"


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


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


def cached_read_manifest(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> tuple[list[Record], str, str]:
    """:func:`unlearning.data.read_manifest`, its records kept under ``cache_dir`` keyed by the file's content.

    The key covers the manifest's SHA-256, its resolved folder (relative image paths resolve
    against it), its format and the cache version. The records are stored column by column as
    one JSON document, written and read by pydantic's JSON codec (~4x the stdlib's speed here).

    Returns:
        (records, sha256 hex digest of the manifest's bytes, outcome "hit", "miss" or "off" without ``cache_dir``).

    Raises:
        OSError, ValueError: as read_manifest (an unreadable file, a row missing a column).
    """
    path = Path(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if cache_dir is None:
        return read_manifest(path), digest, "off"
    key = hashlib.sha256(json.dumps([MANIFEST_CACHE_VERSION, digest, str(path.parent.resolve()), path.suffix == ".csv"]).encode()).hexdigest()
    folder = Path(cache_dir)
    file = folder / f"manifest-{key[:40]}.json"
    try:
        with _no_gc():  # ~200k new containers (no cycles): the collector would walk the whole heap again and again
            records = _records_of(pydantic_core.from_json(file.read_bytes()), key)
        os.utime(file)
        return records, digest, "hit"
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # absent, or not a manifest this wrote: parse again
        pass
    with _no_gc():
        records = read_manifest(path)
    try:
        if hashlib.sha256(path.read_bytes()).hexdigest() == digest:  # not rewritten while it was parsed
            folder.mkdir(parents=True, exist_ok=True)
            tmp = folder / f".{file.name}.{uuid.uuid4().hex}.tmp"
            tmp.write_bytes(pydantic_core.to_json(_columns_of(records, key)))
            os.replace(tmp, file)
            stored = sorted(folder.glob("manifest-*.json"), key=_mtime, reverse=True)
            for old in stored[MANIFEST_CACHE_FILES:]:
                old.unlink(missing_ok=True)
            for stale in folder.glob(".manifest-*.tmp"):
                if time.time() - _mtime(stale) > STALE_TMP_S:
                    stale.unlink(missing_ok=True)
    except OSError:
        pass  # a cache that cannot be written is skipped, not fatal
    return records, digest, "miss"


@contextlib.contextmanager
def _no_gc():
    """The cyclic garbage collector paused (the objects made here hold no cycles)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


_COLUMNS = ("image_path", "label", "caption", "split", "attributes")


def _columns_of(records: list[Record], key: str) -> dict:
    """Records as one JSON document of columns: one parse, not one per row."""
    return {"key": key, **{name: [getattr(r, name) for r in records] for name in _COLUMNS}}


def _records_of(stored: dict, key: str) -> list[Record]:
    if stored.get("key") != key:
        raise ValueError("another manifest's cache")
    columns = [stored[name] for name in _COLUMNS]
    if len({len(column) for column in columns}) != 1 or not all(isinstance(a, dict) for a in columns[-1]):
        raise ValueError("not the columns of one manifest")
    return list(map(Record, *columns))
