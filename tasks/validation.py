"""Data validation of erasure manifests with Great Expectations (GX Core 1.x).

GX checks columns, not files, so each manifest becomes a pandas DataFrame whose per-row facts are
computed first with pathlib and PIL (``inside_root``, ``exists``, ``decodes``, ``width``,
``height``, ``single_frame``, ``content_format``, ``format_matches_name``, ``pixel_mode``,
``in_retain``, ``target_fit``); a GX suite then checks the raw columns and those facts. Files
outside the manifest's root are never opened, and each image is decoded once.

Besides broken files, the suite refuses files that decode but would be read wrongly: captions
longer than :data:`MAX_CAPTION_CHARS`, multi-frame images (which frame is the image?), content
whose format is not the one its name says (a PNG named ``.jpg``), and pixel modes without a known
range (32-bit ``I``, float ``F``; 16-bit greyscale is fine: ``unlearning.data.load_image``
rescales it). With the request's target it also checks that forget rows are images of the target
and that retain rows are not images of a forgotten class or subgroup.

Traversal is checked on the raw ``image_path`` strings: :func:`unlearning.data.read_manifest`
joins them onto the manifest's folder, which hides an absolute path's origin, so
:func:`validate_manifest_file` and :func:`validate_request_data` read the raw rows themselves.

GX is imported inside the functions: the import takes seconds and most callers never validate.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import posixpath
import re
import stat
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import pandas as pd
from PIL import Image

from unlearning.target import ForgetTarget

if TYPE_CHECKING:
    from unlearning.data import Record

# As unlearning.data.REQUIRED_COLUMNS and LOADABLE_MODES (not imported: that module loads torch).
REQUIRED_COLUMNS = ("image_path", "label", "caption")
LOADABLE_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "I;16", "I;16L", "I;16B", "I;16N")
MIN_SIDE, MAX_SIDE = 8, 8192
# CLIP reads a caption's first 77 tokens; far longer text is a broken export or an attack on memory and logs.
MAX_CAPTION_CHARS = 1000
SHOWN_CHARS = 60  # of a label or caption quoted in a report
SHOWN_VALUES = 5  # offending values kept per check

Fetch = Callable[[str], bytes]  # reads an s3:// URI's bytes; raises if the object is missing

_S3_URI = re.compile(r"^s3://(?P<bucket>[a-z0-9][a-z0-9.-]{1,61}[a-z0-9])/(?P<key>.+)$")


def split_s3_uri(uri: str) -> tuple[str, str]:
    """``"s3://bucket/a/b.png"`` -> ``("bucket", "a/b.png")``.

    Args:
        uri: an S3 URI with a valid bucket name (3-63 lowercase letters, digits, dots, hyphens) and a key.

    Raises:
        ValueError: not of that form.
    """
    match = _S3_URI.match(uri)
    if not match:
        raise ValueError(f"not an S3 URI with a bucket and a key: {uri!r}")
    return match["bucket"], match["key"]


class DataValidationError(ValueError):
    """Manifests failed validation; ``report`` holds every check."""

    def __init__(self, message: str, report: "ValidationReport"):
        super().__init__(message)
        self.report = report


@dataclass
class CheckResult:
    """One expectation on one manifest."""

    manifest: str  # role: "forget" or "retain"
    expectation: str  # check name, e.g. "image_exists"
    column: str | None
    success: bool
    unexpected_count: int = 0
    unexpected_values: list[str] = field(default_factory=list)  # a few offenders, e.g. "images/a.png (row 3)"
    fix: str = ""


@dataclass
class ValidationReport:
    """Every check on the manifests of one request.

    Attributes:
        results: one row per expectation and manifest.
        manifests: role -> where the manifest was read from.
        notes: what was not checked, and why.
    """

    results: list[CheckResult] = field(default_factory=list)
    manifests: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def success(self) -> bool:
        return all(r.success for r in self.results)

    @property
    def failures(self) -> list[CheckResult]:
        return [r for r in self.results if not r.success]

    def to_dict(self) -> dict:
        """JSON-serialisable form, to log as an MLflow artifact."""
        return {"success": self.success, "manifests": dict(self.manifests), "notes": list(self.notes),
                "results": [asdict(r) for r in self.results]}

    @classmethod
    def from_dict(cls, data: dict) -> "ValidationReport":
        """The report :meth:`to_dict` wrote."""
        return cls([CheckResult(**r) for r in data["results"]], dict(data["manifests"]), list(data["notes"]))

    def to_markdown(self) -> str:
        """A table of every check, failures first."""
        lines = [f"### Data validation: {'passed' if self.success else 'FAILED'}", ""]
        lines += [f"- {role} manifest: `{where}`" for role, where in self.manifests.items()]
        lines += [f"- note: {note}" for note in self.notes]
        lines += ["", "| manifest | check | column | result | unexpected | examples | fix |", "|---|---|---|---|---|---|---|"]
        for r in sorted(self.results, key=lambda r: r.success):
            examples = ", ".join(r.unexpected_values).replace("|", "\\|")
            lines.append(f"| {r.manifest} | {r.expectation} | {r.column or ''} | {'pass' if r.success else 'FAIL'} | "
                         f"{r.unexpected_count} | {examples} | {'' if r.success else r.fix} |")
        return "\n".join(lines) + "\n"

    def message(self) -> str:
        """One line naming, per manifest, each failed check, a few offenders and the fix."""
        by_manifest: dict[str, list[str]] = {}
        for r in self.failures:
            shown = ", ".join(r.unexpected_values[:3])
            if r.column:
                detail = f"failed for {r.unexpected_count} row{'s' if r.unexpected_count != 1 else ''} (e.g. {shown})"
            else:
                detail = f"failed ({shown})" if shown else "failed"
            by_manifest.setdefault(r.manifest, []).append(f"check {r.expectation} {detail} — {r.fix}")
        return " | ".join(f"{role} manifest {self.manifests.get(role, '')}: " + "; ".join(problems)
                          for role, problems in by_manifest.items())

    def raise_for_failure(self) -> None:
        """Raise :class:`DataValidationError` if any check failed."""
        if not self.success:
            raise DataValidationError(self.message(), self)


def validate_manifests(forget: list[Record] | None, retain: list[Record] | None, class_names: Sequence[str],
                       manifest_roots: dict[str, str | Path], allowed_buckets: Sequence[str] = ()) -> ValidationReport:
    """Validate already-parsed records (their image paths are absolute, as ``read_manifest`` leaves them).

    Args:
        forget: records to forget, or None when the request has none.
        retain: records to keep, or None.
        class_names: the model's classes; every label must be one of them.
        manifest_roots: role ("forget"/"retain") -> the folder its images must stay inside.
        allowed_buckets: buckets S3 image URIs may point into.
    """
    sources, frames = {}, {}
    for role, records in (("forget", forget), ("retain", retain)):
        if records is None:
            continue
        rows = [(i, {"image_path": r.image_path, "label": r.label, "caption": r.caption}) for i, r in enumerate(records, 1)]
        root = str(manifest_roots[role])
        sources[role] = f"{len(records)} records under {root}"
        frames[role] = _frame(rows, root, allowed_buckets, fetch=None)
    return _validate(frames, sources, {}, class_names, allowed_buckets)


def validate_manifest_file(path: str | Path, role: str, class_names: Sequence[str], allowed_buckets: Sequence[str] = (),
                           fetch: Fetch | None = None, root: str | Path | None = None) -> ValidationReport:
    """Validate one raw manifest file (JSONL or CSV, local or ``s3://``).

    Args:
        path: the manifest; image paths in it are relative to its folder (or S3 prefix).
        role: "forget" or "retain" (a forget manifest must not be empty).
        class_names: the model's classes.
        allowed_buckets: buckets S3 images may live in; an S3 manifest's own bucket is allowed
            when this is empty (as ``ErasureSettings.allowed_buckets``).
        fetch: reads an ``s3://`` URI's bytes; needed for S3 manifests. Without it, S3 images are
            only checked for their bucket and path (the report says so in ``notes``).
        root: the folder every image must stay inside; default the manifest's folder. Pass the
            download folder for a manifest that ``tasks.storage.fetch_manifest`` localised, whose
            images from other buckets sit beside, not below, the manifest.
    """
    return _validate_files({role: path}, class_names, allowed_buckets, fetch, root)


def validate_request_data(forget_path: str | Path | None, retain_path: str | Path | None, class_names: Sequence[str],
                          allowed_buckets: Sequence[str] = (), fetch: Fetch | None = None,
                          root: str | Path | None = None, target: ForgetTarget | None = None,
                          erased: Sequence[ForgetTarget] = ()) -> ValidationReport:
    """Validate a request's forget and retain manifests, and that no image is in both.

    Args:
        forget_path: the forget manifest (None: the request brings none).
        retain_path: the request's own retain manifest (None: it brings none; the owner's reference
            data, which the forget images may be part of, is not one).
        class_names: the model's classes.
        allowed_buckets: buckets S3 images may live in (see :func:`validate_manifest_file`).
        fetch: reads an ``s3://`` URI's bytes (see :func:`validate_manifest_file`).
        root: the folder every image must stay inside; default each manifest's own folder.
        target: the request's target: each forget row must be an image of it (class and subgroup
            targets), and no retain row may be.
        erased: targets the model has forgotten before: no retain row may be an image of them.
    """
    paths = {role: path for role, path in (("forget", forget_path), ("retain", retain_path)) if path is not None}
    return _validate_files(paths, class_names, allowed_buckets, fetch, root, target, erased)


# Part of every validation cache key: bump when a check, its fix text or the facts it reads change.
VALIDATION_CACHE_VERSION = "1"
VALIDATION_CACHE_FILES = 256  # most cached reports kept


def cached_validate_request_data(forget_path: str | Path | None, retain_path: str | Path | None, class_names: Sequence[str],
                                 allowed_buckets: Sequence[str] = (), cache_dir: str | Path | None = None,
                                 root: str | Path | None = None, target: ForgetTarget | None = None,
                                 erased: Sequence[ForgetTarget] = ()) -> tuple[ValidationReport, str]:
    """:func:`validate_request_data` of local manifests, the report cached as JSON under ``cache_dir``.

    The key (:func:`validation_key`) covers the manifests' bytes and paths, each image's resolved
    path and bytes, and every other input that changes the result; a cached failure is a failed
    report, so ``raise_for_failure`` fails the same way.

    Returns:
        (report, outcome): outcome "hit", "miss", or "off" (no ``cache_dir``, or an S3 or
        unreadable manifest, which are validated afresh each time).
    """
    paths = {role: path for role, path in (("forget", forget_path), ("retain", retain_path)) if path is not None}
    key = validation_key(paths, class_names, allowed_buckets, root, target, erased) if cache_dir is not None else None
    if key is None:
        return validate_request_data(forget_path, retain_path, class_names, allowed_buckets, None, root, target, erased), "off"
    folder = Path(cache_dir)
    file = folder / f"{key}.json"
    try:
        stored = json.loads(file.read_text())
        if stored.get("key") == key:
            report = ValidationReport.from_dict(stored["report"])
            report.notes.append(f"cached: these manifests, images and checks were validated before with this result (key {key[:16]})")
            file.touch()  # most recently used: pruned last
            return report, "hit"
    except (OSError, ValueError, KeyError, TypeError):  # absent, or not a report this wrote: validate again
        pass
    report = validate_request_data(forget_path, retain_path, class_names, allowed_buckets, None, root, target, erased)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{file.name}.{uuid.uuid4().hex}.tmp"
        tmp.write_text(json.dumps({"key": key, "report": report.to_dict()}))
        os.replace(tmp, file)
        kept = sorted(folder.glob("*.json"), key=lambda f: f.stat().st_mtime, reverse=True)
        for old in kept[VALIDATION_CACHE_FILES:]:
            old.unlink(missing_ok=True)
    except OSError:
        pass  # a cache that cannot be written is skipped, not fatal
    return report, "miss"


def validation_key(paths: dict[str, str | Path], class_names: Sequence[str], allowed_buckets: Sequence[str] = (),
                   root: str | Path | None = None, target: ForgetTarget | None = None,
                   erased: Sequence[ForgetTarget] = ()) -> str | None:
    """A content hash of everything the validation of local manifests ``paths`` (role -> path) reads,
    or None when it cannot be keyed (an S3 or unreadable manifest).

    Per manifest: its path as given (reports name it), its folder, its bytes, and for each local
    image row the image's resolved path (symlinks followed: escapes are checked on it) and bytes.
    Besides: the class names, buckets, root, target and erased targets, and the versions of the
    checks, Pillow and GX.
    """
    from importlib.metadata import version

    from PIL import __version__ as pillow_version

    key = hashlib.blake2b(digest_size=20)

    def add(value) -> None:
        key.update(json.dumps(value, sort_keys=True, default=str).encode() + b"\0")

    add([VALIDATION_CACHE_VERSION, pillow_version, version("great_expectations"), list(class_names), list(allowed_buckets),
         None if root is None else str(Path(root).resolve()), None if target is None else target.model_dump(mode="json"),
         [t.model_dump(mode="json") for t in erased]])
    for role, path in sorted(paths.items()):
        location = str(path)
        if location.startswith("s3://"):
            return None
        try:
            data = Path(location).read_bytes()
            rows = _parse_rows(data.decode("utf-8"), csv_format=location.endswith(".csv"))
        except (OSError, ValueError, _Unreadable):
            return None
        base = str(Path(location).parent.resolve())
        add([role, location, base])
        key.update(hashlib.blake2b(data, digest_size=16).digest())
        parents: dict[str, str] = {}
        for _, row in rows:
            raw = row.get("image_path")
            key.update(_image_state(None if _isnull(raw) else str(raw), base, parents).encode() + b"\0")
    return key.hexdigest()


def _image_state(raw: str | None, base: str, parents: dict[str, str]) -> str:
    """A local image row's resolved path and a hash of its bytes (or why it cannot be read); "" for
    rows whose result follows from the manifest text alone (no path, S3 or other URIs, '..')."""
    if not raw or not raw.strip() or "://" in raw or ".." in raw.split("/"):
        return ""
    joined = os.path.join(base, raw)  # an absolute path replaces the base, as in _locate
    folder, name = os.path.split(joined)
    try:
        link = stat.S_ISLNK(os.lstat(joined).st_mode)
    except OSError:
        link = False
    if link or name in ("", ".", ".."):
        resolved = os.path.realpath(joined)
    else:  # os.path.realpath per file is slow; a plain file's real path is its folder's plus its name
        if folder not in parents:
            parents[folder] = os.path.realpath(folder)
        resolved = os.path.join(parents[folder], name)
    try:
        with open(resolved, "rb") as handle:
            content = hashlib.blake2b(handle.read(), digest_size=16).hexdigest()
    except OSError as exc:
        content = type(exc).__name__
    return f"{resolved}\0{content}"


def _validate_files(paths: dict[str, str | Path], class_names: Sequence[str], allowed_buckets: Sequence[str],
                    fetch: Fetch | None, root: str | Path | None, target: ForgetTarget | None = None,
                    erased: Sequence[ForgetTarget] = ()) -> ValidationReport:
    frames, unreadable, notes = {}, {}, []
    for role, path in paths.items():
        frame, problem, role_notes = _load(path, role, allowed_buckets, fetch, root, _target_fit(role, target, erased))
        notes += role_notes
        if frame is not None:
            frames[role] = frame
        else:
            unreadable[role] = problem
    sources = {role: str(path) for role, path in paths.items()}
    return _validate(frames, sources, unreadable, class_names, allowed_buckets, notes, target)


# Why a raw row does not fit the request's targets (None: it fits); see _target_fit.
Fit = Callable[[dict, dict], "str | None"]


def _target_fit(role: str, target: ForgetTarget | None, erased: Sequence[ForgetTarget]) -> Fit | None:
    """For a forget manifest: why a row is not an image of a class or subgroup ``target``. For a
    retain manifest: which forgotten class or subgroup (``target`` or ``erased``) a row is an image of.
    None when there is nothing to check (association targets are pairs, not labels)."""
    if role == "forget":
        if target is None or target.kind == "association":
            return None

        def misfit(row: dict, attributes: dict) -> str | None:
            record = _RowView(str(row.get("label")), str(row.get("caption")), attributes)
            if target.matches(record):
                return None
            if record.label != target.class_name:
                return f"labelled {_shorten(record.label)}"
            if target.attribute not in attributes:
                return f"no {target.attribute} attribute"
            return f"{target.attribute} {_shorten(str(attributes[target.attribute]))}"
        return misfit
    forgotten = [t for t in ([target] if target else []) + list(erased) if t.kind != "association"]
    if not forgotten:
        return None

    def forgotten_image(row: dict, attributes: dict) -> str | None:
        record = _RowView(str(row.get("label")), str(row.get("caption")), attributes)
        hit = next((t for t in forgotten if t.matches(record)), None)
        if hit is None:
            return None
        return f"an image of the target {hit.name!r}" if hit is target else f"an image of {hit.name!r}, erased before"
    return forgotten_image


@dataclass(frozen=True)
class _RowView:
    """The parts of a raw row that ForgetTarget.matches reads, as read_manifest would make them."""

    label: str
    caption: str
    attributes: dict


def _attributes(row: dict, csv_format: bool) -> dict:
    """A raw row's attributes as read_manifest reads them: the "attributes" object, or a CSV's extra columns."""
    if csv_format:
        return {k: v for k, v in row.items() if k not in (*REQUIRED_COLUMNS, "split")}
    attributes = row.get("attributes")
    return attributes if isinstance(attributes, dict) else {}


def _load(path: str | Path, role: str, allowed_buckets: Sequence[str], fetch: Fetch | None, root: str | Path | None,
          fit: Fit | None = None) -> tuple[pd.DataFrame | None, str | None, list[str]]:
    """(frame, None, notes), or (None, why the manifest is unreadable, [])."""
    location = str(path)
    own = _S3_URI.match(location)
    if own and not allowed_buckets:  # as ErasureSettings.allowed_buckets: none listed means the manifest's own bucket
        allowed_buckets = [own["bucket"]]
    try:
        text, base = _read_text(location, allowed_buckets, fetch)
        csv_format = location.endswith(".csv")
        rows = _parse_rows(text, csv_format=csv_format)
    except _Unreadable as exc:
        return None, str(exc), []
    frame = _frame(rows, base, allowed_buckets, fetch, root)
    if fit is not None:
        # A row without a label is reported by label_not_null alone.
        frame["target_fit"] = [None if _isnull(row.get("label")) else fit(row, _attributes(row, csv_format)) for _, row in rows]
    unopened = sum(1 for where, inside, exists in zip(frame["resolved"], frame["inside_root"], frame["exists"])
                   if inside is True and exists is None and where.startswith("s3://"))
    notes = [f"{role}: {unopened} S3 images were not opened (no fetch function); only their paths were checked"] if unopened else []
    return frame, None, notes


class _Unreadable(Exception):
    """Why a manifest cannot be read; reported as a failed check, not raised to the caller."""


def _read_text(location: str, allowed_buckets: Sequence[str], fetch: Fetch | None) -> tuple[str, str]:
    """The manifest's text and the base its relative image paths start from (its folder or ``s3://bucket/prefix/``)."""
    try:
        if not location.startswith("s3://"):
            return Path(location).read_text(), str(Path(location).parent.resolve())
        bucket, key = split_s3_uri(location)
        if bucket not in allowed_buckets:
            raise _Unreadable(f"bucket {bucket!r} is not an allowed bucket ({', '.join(allowed_buckets) or 'none configured'})")
        if fetch is None:
            raise _Unreadable("reading a manifest from S3 needs a fetch function; none was given")
        try:
            data = fetch(location)
        except Exception as exc:  # a fetcher's errors are backend-specific (botocore ClientError, ...)
            raise _Unreadable(f"cannot fetch it: {exc}") from None
        return data.decode("utf-8"), f"s3://{bucket}/{posixpath.dirname(key)}".rstrip("/") + "/"
    except OSError as exc:
        raise _Unreadable(f"cannot read it: {exc.strerror or exc}") from None
    except ValueError as exc:  # a malformed S3 URI, or bytes that are not UTF-8
        raise _Unreadable(f"cannot read it: {exc}") from None


def _parse_rows(text: str, csv_format: bool) -> list[tuple[int, dict]]:
    """(line number, raw row) pairs; CSV's empty cells in required columns count as missing."""
    if csv_format:
        reader = csv.DictReader(io.StringIO(text))
        rows = []
        try:
            for row in reader:
                rows.append((reader.line_num, {k: (None if k in REQUIRED_COLUMNS and v == "" else v) for k, v in row.items()}))
        except csv.Error as exc:
            raise _Unreadable(f"line {reader.line_num} is not valid CSV ({exc})") from None
        return rows
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise _Unreadable(f"line {number} is not valid JSON ({exc.msg}, column {exc.colno})") from None
        if not isinstance(row, dict):
            raise _Unreadable(f"line {number} is not a JSON object")
        rows.append((number, row))
    return rows


def _frame(rows: list[tuple[int, dict]], base: str, allowed_buckets: Sequence[str], fetch: Fetch | None,
           root: str | Path | None = None) -> pd.DataFrame:
    """The manifest as a DataFrame: required columns as given (absent ones stay absent) plus computed facts.

    Relative image paths start from ``base``; local images must stay inside ``root`` (default ``base``).
    """
    present = [c for c in REQUIRED_COLUMNS if any(c in row for _, row in rows)] if rows else list(REQUIRED_COLUMNS)
    if not base.startswith("s3://"):
        base, root = str(Path(base).resolve()), Path(root if root is not None else base).resolve()
    records = []
    for number, row in rows:
        # Non-null values become strings, as read_manifest makes them, so regex checks see text.
        values = {c: (None if _isnull(row.get(c)) else str(row.get(c))) for c in present}
        if values.get("image_path") is not None and not values["image_path"].strip():
            values["image_path"] = None  # a blank path is a missing path
        resolved, inside = _locate(values.get("image_path"), base, root, allowed_buckets)
        facts = _inspect(resolved, fetch) if inside else dict.fromkeys(IMAGE_FACTS)
        records.append({"row": number, **values, "resolved": resolved, "inside_root": inside, **facts})
    columns = ["row", *present, "resolved", "inside_root", *IMAGE_FACTS]
    # object dtype keeps None as None (not NaN) and booleans as booleans for the set checks.
    return pd.DataFrame(records, columns=columns, dtype=object)


def _locate(raw: str | None, base: str, root: Path | None, allowed_buckets: Sequence[str]) -> tuple[str | None, bool | None]:
    """(resolved location, whether it stays inside ``root`` or an allowed bucket).

    ``base`` is a resolved folder or an ``s3://bucket/prefix/``; ``root`` a resolved folder (None for S3).
    """
    if raw is None:
        return None, None
    if raw.startswith("s3://"):
        try:
            bucket, key = split_s3_uri(raw)
        except ValueError:
            return raw, False
        return raw, bucket in allowed_buckets and ".." not in key.split("/")
    if "://" in raw:
        return raw, False
    if base.startswith("s3://"):
        if raw.startswith("/") or ".." in raw.split("/"):
            return base + raw, False
        bucket = base.removeprefix("s3://").split("/", 1)[0]
        return base + posixpath.normpath(raw), bucket in allowed_buckets
    path = Path(raw)
    if ".." in path.parts:
        return os.path.normpath(Path(base) / path), False
    # resolve() follows symlinks: a link inside the root that points outside it is an escape too.
    resolved = (Path(base) / path).resolve()  # an absolute path replaces the base here
    return str(resolved), resolved.is_relative_to(root)


IMAGE_FACTS = ("exists", "decodes", "width", "height", "single_frame", "content_format", "format_matches_name", "pixel_mode")
# Formats one file extension may hold: Pillow reads camera JPEGs that carry a preview as "MPO".
_FORMAT_FAMILY = {"MPO": "JPEG"}


def _inspect(location: str, fetch: Fetch | None) -> dict:
    """The :data:`IMAGE_FACTS` of one image, from its header and one decode; None where not checked."""
    facts: dict = dict.fromkeys(IMAGE_FACTS)
    if location.startswith("s3://"):
        if fetch is None:
            return facts
        try:
            source = io.BytesIO(fetch(location))
        except Exception:  # a fetcher's "missing" is backend-specific (ClientError, KeyError, ...)
            return {**facts, "exists": False}
    else:
        if not Path(location).is_file():
            return {**facts, "exists": False}
        source = location
    facts["exists"] = True
    try:
        with Image.open(source) as image:
            named = Image.registered_extensions().get(posixpath.splitext(location)[1].lower())
            facts.update(width=image.width, height=image.height, content_format=image.format, pixel_mode=image.mode,
                         format_matches_name=_FORMAT_FAMILY.get(named, named) == _FORMAT_FAMILY.get(image.format, image.format))
            if not (MIN_SIDE <= image.width <= MAX_SIDE and MIN_SIDE <= image.height <= MAX_SIDE):
                return facts  # not decoded: the size check already fails, and it may be a bomb
            # is_animated reads frame headers only; an MPO's second frame is a preview of the first.
            facts["single_frame"] = image.format == "MPO" or not getattr(image, "is_animated", False)
            image.load()
    except Exception:  # PIL plugins raise OSError, SyntaxError, ValueError, DecompressionBombError, ...
        return {**dict.fromkeys(IMAGE_FACTS), "exists": True, "decodes": False}
    facts["decodes"] = True
    return facts


def _isnull(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


@dataclass(frozen=True)
class _Check:
    name: str
    column: str | None
    fix: str


def _checks(role: str, frame: pd.DataFrame, class_names: Sequence[str], allowed_buckets: Sequence[str],
            target: ForgetTarget | None = None) -> list[tuple[_Check, object]]:
    """(check, GX expectation) pairs for one manifest; column checks only for columns it has."""
    import great_expectations.expectations as gxe

    classes = ", ".join(list(class_names)[:12]) + (", ..." if len(class_names) > 12 else "")
    buckets = ", ".join(allowed_buckets) or "none configured"
    checks: list[tuple[_Check, object]] = [
        (_Check("columns_present", None, f"give every row {', '.join(REQUIRED_COLUMNS)}"),
         gxe.ExpectTableColumnsToMatchSet(column_set=list(REQUIRED_COLUMNS), exact_match=False)),
        (_Check("not_empty", None, f"the {role} manifest lists no images; add at least one row"),
         gxe.ExpectTableRowCountToBeBetween(min_value=1)),
    ]
    for column in REQUIRED_COLUMNS:
        if column in frame.columns:
            checks.append((_Check(f"{column}_not_null", column, f"give every row a non-empty {column}"),
                           gxe.ExpectColumnValuesToNotBeNull(column=column)))
    if "label" in frame.columns:
        checks.append((_Check("label_known", "label", f"use one of the model's classes: {classes}"),
                       gxe.ExpectColumnValuesToBeInSet(column="label", value_set=list(class_names))))
    if "caption" in frame.columns:
        checks.append((_Check("caption_not_empty", "caption", "write a caption for every image"),
                       gxe.ExpectColumnValuesToMatchRegex(column="caption", regex=r"\S")))
        checks.append((_Check("caption_length", "caption", f"shorten captions to at most {MAX_CAPTION_CHARS:,} characters "
                              "(CLIP reads only a caption's first 77 tokens)"),
                       gxe.ExpectColumnValueLengthsToBeBetween(column="caption", max_value=MAX_CAPTION_CHARS)))
    checks += [
        (_Check("image_path_unique", "resolved", "list each image once"),
         gxe.ExpectColumnValuesToBeUnique(column="resolved")),
        (_Check("image_inside_root", "inside_root",
                f"keep image paths relative to the manifest's folder, without '..'; S3 images must be in an allowed bucket ({buckets})"),
         gxe.ExpectColumnValuesToBeInSet(column="inside_root", value_set=[True])),
        (_Check("image_exists", "exists", "add the missing images or fix their paths"),
         gxe.ExpectColumnValuesToBeInSet(column="exists", value_set=[True])),
        (_Check("image_decodes", "decodes", "replace these files with valid images (PNG, JPEG, ...)"),
         gxe.ExpectColumnValuesToBeInSet(column="decodes", value_set=[True])),
        (_Check("image_single_frame", "single_frame", "use images of 1 frame: animated GIFs, multi-page TIFFs and other "
                "multi-frame files are refused; save the frame you mean as a PNG"),
         gxe.ExpectColumnValuesToBeInSet(column="single_frame", value_set=[True])),
        (_Check("image_format_matches_name", "format_matches_name", "name each file with its format's extension "
                "(.png for PNG content, .jpg for JPEG), or convert it to the format its name says"),
         gxe.ExpectColumnValuesToBeInSet(column="format_matches_name", value_set=[True])),
        (_Check("image_mode_loadable", "pixel_mode", "save these images as 8-bit RGB or greyscale (16-bit greyscale also "
                "works); 32-bit integer and float pixels have no known range"),
         gxe.ExpectColumnValuesToBeInSet(column="pixel_mode", value_set=list(LOADABLE_MODES))),
    ]
    for side in ("width", "height"):
        checks.append((_Check("image_size_sane", side, f"use images between {MIN_SIDE} and {MAX_SIDE} px a side"),
                       gxe.ExpectColumnValuesToBeBetween(column=side, min_value=MIN_SIDE, max_value=MAX_SIDE)))
    if "in_retain" in frame.columns:
        checks.append((_Check("no_forget_retain_overlap", "in_retain",
                               "an image cannot be both forgotten and kept; remove it from one of the manifests"),
                       gxe.ExpectColumnValuesToBeInSet(column="in_retain", value_set=[False])))
    if "target_fit" in frame.columns and role == "forget":
        wanted = f"label {target.class_name!r}" + (f" and {target.attribute} {target.value!r}" if target.kind == "subgroup" else "")
        checks.append((_Check("forget_row_in_target", "target_fit", f"list only images of the target {target.name!r} "
                              f"({wanted}) in the forget manifest, or change the target"),
                       gxe.ExpectColumnValuesToBeNull(column="target_fit")))
    elif "target_fit" in frame.columns:
        checks.append((_Check("retain_row_not_forgotten", "target_fit", "remove images of forgotten classes and subgroups "
                              "from the retain manifest: training on them would teach the model back what it forgets"),
                       gxe.ExpectColumnValuesToBeNull(column="target_fit")))
    return checks


def _validate(frames: dict[str, pd.DataFrame], sources: dict[str, str], unreadable: dict[str, str], class_names: Sequence[str],
              allowed_buckets: Sequence[str], notes: list[str] | None = None, target: ForgetTarget | None = None) -> ValidationReport:
    """Run one GX suite per readable manifest; unreadable ones become failed ``manifest_readable`` rows."""
    report = ValidationReport(manifests=dict(sources), notes=list(notes or []))
    for role, problem in unreadable.items():
        report.results.append(CheckResult(role, "manifest_readable", None, False, 1, [problem],
                                          "check the path and the format: one JSON object per line (.jsonl), or CSV with a header row"))
    if "forget" in frames and "retain" in frames:
        retained = set(frames["retain"]["resolved"].dropna())
        frames["forget"]["in_retain"] = [None if r is None else r in retained for r in frames["forget"]["resolved"]]
    if not frames:
        return report

    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")  # offline: no usage statistics calls
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")  # nothing written to disk

    context.variables.progress_bars = ProgressBarsConfig(globally=False)  # tqdm bars would flood flow logs
    source = context.data_sources.add_pandas("manifests")
    for role, frame in frames.items():
        checks = _checks(role, frame, class_names, allowed_buckets, target)
        suite = gx.ExpectationSuite(name=f"{role}_manifest")
        for index, (_, expectation) in enumerate(checks):
            expectation.meta = {"check_index": index}
            suite.add_expectation(expectation)
        batch = source.add_dataframe_asset(name=role).add_batch_definition_whole_dataframe("whole").get_batch(
            batch_parameters={"dataframe": frame})
        # to name offending rows (and, for a format mismatch, what the content is)
        index_columns = ["row", "image_path", "content_format"] if "image_path" in frame else ["row", "content_format"]
        result = batch.validate(suite, result_format={"result_format": "SUMMARY", "partial_unexpected_count": SHOWN_VALUES,
                                                      "unexpected_index_column_names": index_columns})
        for outcome in result.results:
            check = checks[outcome.expectation_config.meta["check_index"]][0]
            report.results.append(_check_result(role, check, outcome))
    return report


def _check_result(role: str, check: _Check, outcome) -> CheckResult:
    """A GX ExpectationValidationResult as a report row with readable offenders."""
    result = outcome.result or {}
    if check.column is None:  # table-level: show what was observed
        if check.name == "columns_present":
            missing = result.get("details", {}).get("mismatched", {}).get("missing", [])
            shown = [f"missing: {', '.join(missing)}"] if missing else []
            return CheckResult(role, check.name, None, outcome.success, len(missing), shown, check.fix)
        return CheckResult(role, check.name, None, outcome.success, int(not outcome.success),
                           [] if outcome.success else [f"{result.get('observed_value')} rows"], check.fix)
    shown = [_offender(item, check) for item in result.get("partial_unexpected_index_list") or []]
    if outcome.exception_info and outcome.exception_info.get("raised_exception"):
        shown = [outcome.exception_info.get("exception_message", "GX raised an error")]
    return CheckResult(role, check.name, check.column, outcome.success, int(result.get("unexpected_count") or 0),
                       shown[:SHOWN_VALUES], check.fix)


def _offender(item: dict, check: _Check) -> str:
    """"images/a.png (row 3)", with what is wrong where the check alone does not say (a size, a
    mode, a format), or the bad value itself for label and caption checks."""
    column = check.column
    where = f"row {int(item['row'])}"
    value, path = item.get(column), item.get("image_path")
    if check.name == "caption_length" and not _isnull(value):
        return f"{path} ({len(value):,} characters, {where})" if not _isnull(path) else f"{len(value):,} characters ({where})"
    if column in ("label", "caption") and not _isnull(value):
        return f"{_shorten(value)} ({where})"
    if column in ("width", "height") and not _isnull(value):
        return f"{path} ({int(value)} px {column}, {where})"
    if column == "pixel_mode" and not _isnull(value):
        return f"{path} (mode {value}, {where})"
    if column == "format_matches_name" and not _isnull(item.get("content_format")):
        return f"{path} ({item['content_format']} content, {where})"
    if column == "target_fit" and not _isnull(value):
        return f"{path} ({value}, {where})"
    return f"{path} ({where})" if not _isnull(path) else where


def _shorten(text: str) -> str:
    """A value quoted for a report, cut to :data:`SHOWN_CHARS` characters."""
    return json.dumps(text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS] + "...")
