"""S3 I/O for models and manifests (tasks/bridge.py adds SQS for the deletion bridge): manifests in, model folders out.

Works with AWS and with S3-compatible servers (SeaweedFS, MinIO, moto) through
``ERASURE_S3_ENDPOINT_URL``. Credentials come from the standard AWS chain, never from settings.
The library ``unlearning/`` only ever sees local folders: :func:`resolve_model_ref` and
:func:`fetch_manifest` bring S3 data to disk first.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

from tasks.settings import ErasureSettings, get_settings

S3 = "s3://"
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
_MISSING = {"404", "NoSuchKey", "NoSuchBucket", "NotFound"}
_DENIED = {"403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"}
_WORKERS = 8  # parallel transfers: manifests reference many small images


def s3_client(settings: ErasureSettings | None = None):
    """A boto3 S3 client for the configured endpoint.

    Args:
        settings: endpoint and region; defaults to :func:`tasks.settings.get_settings`.
    """
    settings = settings or get_settings()
    config = Config(
        retries={"mode": "standard", "max_attempts": 5},
        # S3-compatible servers rarely resolve virtual-host bucket names like bucket.127.0.0.1.
        s3={"addressing_style": "path"},
    )
    # A fresh session per client: boto3's default session is not thread-safe.
    return boto3.session.Session().client(
        "s3", endpoint_url=settings.s3_endpoint_url, region_name=settings.s3_region, config=config
    )


def is_s3(uri: str | Path) -> bool:
    """Whether ``uri`` is an ``s3://`` URI."""
    return str(uri).startswith(S3)


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """Split ``s3://bucket/key`` into ``(bucket, key)``; the key may be empty.

    Args:
        uri: an ``s3://`` URI.

    Raises:
        ValueError: not an ``s3://`` URI, or no valid bucket name.
    """
    if not is_s3(uri):
        raise ValueError(f"not an S3 URI: {uri!r} (expected s3://bucket/key)")
    bucket, _, key = str(uri)[len(S3):].partition("/")
    if not _BUCKET.match(bucket):
        raise ValueError(f"S3 URI {uri!r} has no valid bucket name (3-63 lowercase letters, digits, '.', '-')")
    return bucket, key


def download_prefix(uri: str, dest_dir: str | Path, settings: ErasureSettings | None = None) -> Path:
    """Download every object under an S3 prefix into ``dest_dir``, keeping relative paths.

    Args:
        uri: ``s3://bucket/prefix`` (a "folder"; ``prefix/`` and ``prefix`` are the same).
        dest_dir: local folder, created if needed; existing files are overwritten.
        settings: S3 endpoint; defaults to :func:`get_settings`.

    Returns:
        ``dest_dir``.

    Raises:
        FileNotFoundError: nothing is stored under ``uri``.
    """
    bucket, prefix = parse_s3_uri(uri)
    prefix = _as_folder(prefix)
    client = s3_client(settings)
    dest = Path(dest_dir)
    with _s3_errors(uri):
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        keys = [obj["Key"] for page in pages for obj in page.get("Contents", []) if not obj["Key"].endswith("/")]
    if not keys:
        raise FileNotFoundError(f"nothing stored under {uri}: check the URI, or upload the folder first (tasks.storage.upload_folder)")
    jobs = [(bucket, key, dest / _safe_relative(key[len(prefix):], uri)) for key in keys]
    _parallel(lambda job: _download(client, *job), jobs)
    return dest


def upload_folder(folder: str | Path, uri: str, settings: ErasureSettings | None = None) -> str:
    """Upload every file under ``folder`` to the S3 prefix ``uri``, keeping relative paths.

    Args:
        folder: local folder, e.g. one written by ``unlearning.models.save_model``.
        uri: destination ``s3://bucket/prefix``.
        settings: S3 endpoint; defaults to :func:`get_settings`.

    Returns:
        ``uri``.
    """
    bucket, prefix = parse_s3_uri(uri)
    prefix = _as_folder(prefix)
    folder = Path(folder)
    files = [p for p in sorted(folder.rglob("*")) if p.is_file()]
    if not files:
        raise FileNotFoundError(f"{folder} holds no files to upload to {uri}")
    client = s3_client(settings)

    def upload(path: Path) -> None:
        key = prefix + path.relative_to(folder).as_posix()
        with _s3_errors(f"{S3}{bucket}/{key}"):
            client.upload_file(str(path), bucket, key)

    _parallel(upload, files)
    return uri


def fetch_manifest(uri: str, dest_dir: str | Path, settings: ErasureSettings | None = None) -> Path:
    """Download a manifest and the images it references, and return the local manifest.

    Relative ``image_path`` values resolve under the manifest's prefix and keep their relative
    path locally; ``s3://`` values must name an allowed bucket and are rewritten to their local
    copy. Files land under ``dest_dir/<bucket>/<key>``, so the result reads with
    ``unlearning.data.read_manifest``.

    Args:
        uri: ``s3://bucket/prefix/manifest.jsonl`` (JSON lines) or ``.csv``.
        dest_dir: local cache folder.
        settings: S3 endpoint and ``allowed_buckets`` (empty: only the manifest's own bucket).

    Raises:
        ValueError: an image path escapes the manifest's prefix (``..``, absolute paths, other
            URL schemes) or names a bucket outside ``allowed_buckets``.
        FileNotFoundError: the manifest or an image is missing.
    """
    settings = settings or get_settings()
    bucket, key = parse_s3_uri(uri)
    if not key or key.endswith("/"):
        raise ValueError(f"{uri} names a folder; pass the manifest file, e.g. {_as_folder(uri)}manifest.jsonl")
    allowed = set(settings.allowed_buckets) or {bucket}
    _check_bucket(bucket, allowed, uri)
    client = s3_client(settings)
    dest = Path(dest_dir)
    local_manifest = dest / bucket / _safe_relative(key, uri)
    _download(client, bucket, key, local_manifest)

    prefix = _as_folder(key.rpartition("/")[0])
    rows, write = _read_rows(local_manifest)
    jobs = {}
    for number, row in enumerate(rows, start=1):
        where = f"{uri} row {number}"
        image = str(row.get("image_path") or "")
        if not image:
            raise ValueError(f"{where}: no image_path")
        if is_s3(image):
            image_bucket, image_key = parse_s3_uri(image)
            _check_bucket(image_bucket, allowed, where)
            local = dest / image_bucket / _safe_relative(image_key, where)
            row["image_path"] = str(local.resolve())
        elif "://" in image:
            raise ValueError(f"{where}: image path {image!r} must be relative to the manifest or an s3:// URI")
        else:
            relative = _safe_relative(image, where)
            image_bucket, image_key, local = bucket, prefix + relative.as_posix(), local_manifest.parent / relative
            row["image_path"] = relative.as_posix()
        jobs[local] = (image_bucket, image_key, local)
    _parallel(lambda job: _download(client, *job), jobs.values())
    write(rows)
    return local_manifest


def resolve_model_ref(ref: str, settings: ErasureSettings | None, cache_dir: str | Path) -> str:
    """Turn an ``s3://`` model prefix into a ``local-dir:`` ref by downloading it; pass others through.

    ``unlearning.models.load_model(resolve_model_ref(ref, settings, cache))`` thus loads names,
    folders and S3 prefixes alike.

    Args:
        ref: ``s3://bucket/models/m1`` (an open_clip model folder) or any ``load_model`` ref.
        settings: S3 endpoint; defaults to :func:`get_settings`.
        cache_dir: where S3 models are downloaded, as ``cache_dir/<bucket>/<prefix>``.
    """
    if not is_s3(ref):
        return ref
    # Imported here so that storage without models (manifests, uploads) does not pull in torch.
    from unlearning.models import CONFIG_FILE, LOCAL_DIR

    bucket, prefix = parse_s3_uri(ref)
    folder = download_prefix(ref, Path(cache_dir) / bucket / _safe_relative(prefix, ref), settings)
    if not (folder / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{ref} is not an open_clip model folder (no {CONFIG_FILE}): upload one written by unlearning.models.save_model")
    return LOCAL_DIR + str(folder.resolve())


def _as_folder(prefix: str) -> str:
    return prefix if not prefix or prefix.endswith("/") else prefix + "/"


def _safe_relative(path: str, where: str) -> PurePosixPath:
    """``path`` as a relative path that cannot climb out of the folder it is joined to."""
    relative = PurePosixPath(path)
    if relative.is_absolute() or ".." in relative.parts or "\\" in path:
        raise ValueError(f"{where}: path {path!r} escapes its prefix (absolute paths and '..' are not allowed)")
    return relative


def _check_bucket(bucket: str, allowed: set[str], where: str) -> None:
    if bucket not in allowed:
        raise ValueError(f"{where}: bucket {bucket!r} is not allowed; allowed: {sorted(allowed)} (set ERASURE_ALLOWED_BUCKETS)")


def _read_rows(path: Path) -> tuple[list[dict], Callable[[list[dict]], None]]:
    """Rows of a JSON-lines or CSV manifest, and a function that writes rows back in that format."""
    text = path.read_text()
    if path.suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        rows = list(reader)

        def write(rows: list[dict]) -> None:
            with path.open("w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=reader.fieldnames or [])
                writer.writeheader()
                writer.writerows(rows)

        return rows, write
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    return rows, lambda rows: path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def _download(client, bucket: str, key: str, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _s3_errors(f"{S3}{bucket}/{key}"):
        client.download_file(bucket, key, str(dest))


def _parallel(fn: Callable, items: Iterable) -> None:
    with ThreadPoolExecutor(max_workers=_WORKERS) as pool:
        list(pool.map(fn, items))  # list() re-raises the first failure


@contextmanager
def _s3_errors(uri: str) -> Iterator[None]:
    """Turn botocore's errors into one-line errors that name the URI and the fix."""
    try:
        yield
    except ClientError as error:
        code = str(error.response.get("Error", {}).get("Code", ""))
        if code == "NoSuchBucket":
            raise FileNotFoundError(f"bucket of {uri} does not exist: create it or fix the URI") from None
        if code in _MISSING:
            raise FileNotFoundError(f"{uri} does not exist: check the URI, or upload it first (tasks.storage.upload_folder)") from None
        if code in _DENIED:
            raise PermissionError(f"access to {uri} denied ({code}): check the AWS credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE)") from None
        raise
    except NoCredentialsError:
        raise PermissionError(f"no AWS credentials to read {uri}: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE") from None
    except EndpointConnectionError as error:
        raise ConnectionError(f"cannot reach S3 for {uri} ({error.kwargs.get('endpoint_url')}): check ERASURE_S3_ENDPOINT_URL") from None


s3_errors = _s3_errors  # public name for other S3 users (the inbox): boto3 errors as one clear line naming the URI
