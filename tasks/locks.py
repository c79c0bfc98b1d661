"""Exclusive locks: at most one holder per name, e.g. ``request:req-1`` or ``model:shapes-clip``.

Hold :func:`exclusive` around "read the ledger, decide, start an attempt, run" so that two runs of
one request (or two promotions of one model) never overlap. It is a real lock, not a check of
ledger tags followed by an act. Two backends, chosen by :func:`lock_backend` from
``ERASURE_LOCKS`` (``auto``, ``file``, ``prefect``):

- ``file``: ``fcntl.flock`` on ``<ERASURE_HOME>/locks/<name>.lock``. The kernel frees the lock
  when its process dies (``kill -9`` included), so a crash never leaves it stuck. It only guards
  processes on one machine that share that file system (flock over NFS is unreliable). Right for the
  local default: a SQLite store on one machine. ``auto`` picks it when no Prefect server is set.
- ``prefect``: a Prefect global concurrency limit of 1 per name (created on first use), taken
  with a lease that the holder renews. A killed holder's slot is freed when its lease runs out
  (``ERASURE_LEASE_SECONDS``, at least the server's 60 s minimum). Right when workers on several
  machines share one Prefect server. ``auto`` picks it whenever ``PREFECT_API_URL`` is set.

Neither lock is reentrant: a thread taking a name it already holds waits for itself.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import socket
import time
from contextlib import ExitStack, contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Literal

if TYPE_CHECKING:
    from tasks.settings import ErasureSettings

PREFECT_LIMIT_PREFIX = "clip-erasure."
PREFECT_MIN_LEASE_S = 60.0  # the Prefect server refuses shorter concurrency leases
_known_limits: set[tuple[str, str]] = set()  # (API URL, limit) already created or checked in this process


class LockTimeout(TimeoutError):
    """A lock held by someone else for longer than the caller would wait."""

    def __init__(self, message: str, name: str, waited_s: float, holder: dict | None = None):
        super().__init__(message)
        self.name, self.waited_s, self.holder = name, waited_s, holder or {}


def lock_backend(settings: "ErasureSettings") -> Literal["prefect", "file"]:
    """``settings.locks`` unless it is ``auto``; then ``prefect`` when a Prefect API server is configured, else ``file``."""
    if settings.locks != "auto":
        return settings.locks
    from prefect.settings import get_current_settings

    return "prefect" if get_current_settings().api.url else "file"


@contextmanager
def exclusive(name: str, settings: "ErasureSettings", timeout_s: float | None = None, poll_s: float = 0.5) -> Iterator[None]:
    """Hold the lock ``name`` while the block runs.

    Args:
        name: what is locked, e.g. ``"request:req-1"``, ``"model:shapes-clip"``.
        settings: ``locks`` picks the backend, ``home`` holds the lock files, ``lease_seconds``
            the Prefect lease.
        timeout_s: how long to wait for a holder to let go; None waits forever, 0 tries once.
        poll_s: seconds between tries.

    Raises:
        LockTimeout: still held after ``timeout_s``; the message says by whom, when known.
    """
    if not name or not name.strip():
        raise ValueError('lock name is empty: name what is locked, e.g. "request:req-1"')
    if timeout_s is not None and timeout_s < 0:
        raise ValueError(f"timeout_s must be None (wait forever) or >= 0, got {timeout_s}")
    if poll_s <= 0:
        raise ValueError(f"poll_s must be positive, got {poll_s}")
    backend = _prefect_lock if lock_backend(settings) == "prefect" else _file_lock
    with backend(name, settings, timeout_s, poll_s):
        yield


def safe_name(name: str) -> str:
    """``name`` as a file or limit name: letters, digits, ``._-`` (``:`` becomes ``.``); a short hash keeps altered names apart."""
    readable = name.replace(":", ".")
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", readable).strip(".") or "lock"
    if safe != readable:
        safe += "-" + hashlib.sha1(name.encode()).hexdigest()[:8]
    return safe[:150]


@contextmanager
def _file_lock(name: str, settings: "ErasureSettings", timeout_s: float | None, poll_s: float) -> Iterator[None]:
    folder = Path(settings.home) / "locks"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{safe_name(name)}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # a descriptor of our own: flock excludes other descriptors, threads included
    try:
        started = time.monotonic()
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                waited = time.monotonic() - started
                if timeout_s is not None and waited >= timeout_s:
                    holder = _read_holder(path)
                    raise LockTimeout(_file_message(name, path, holder, waited), name, waited, holder) from None
                time.sleep(poll_s if timeout_s is None else min(poll_s, max(timeout_s - waited, 0.001)))
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  "lock": name}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # the lock itself goes with the descriptor
    finally:
        os.close(fd)


def _read_holder(path: Path) -> dict:
    try:
        holder = json.loads(path.read_text() or "{}")
    except (OSError, json.JSONDecodeError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _file_message(name: str, path: Path, holder: dict, waited: float) -> str:
    who = (f"process {holder.get('pid')} on {holder.get('host')} since {holder.get('since')}" if holder.get("pid")
           else "another process")
    return (f"lock {name!r} is held by {who} (file {path}); waited {waited:.1f} s — wait until that run finishes and try "
            f"again, or stop it if it is stuck (a stopped process, even kill -9, frees the lock at once)")


@contextmanager
def _prefect_lock(name: str, settings: "ErasureSettings", timeout_s: float | None, poll_s: float) -> Iterator[None]:
    import httpx
    from prefect.concurrency.asyncio import ConcurrencySlotAcquisitionError
    from prefect.concurrency.sync import concurrency

    limit = PREFECT_LIMIT_PREFIX + safe_name(name)
    _ensure_limit(limit)
    lease_s = max(PREFECT_MIN_LEASE_S, settings.lease_seconds)
    holder = _prefect_holder()
    started = time.monotonic()
    with ExitStack() as stack:
        while True:
            try:
                # One try per round (max_retries=0), so timeout_s and poll_s mean the same as with files.
                stack.enter_context(concurrency(limit, occupy=1, max_retries=0, lease_duration=lease_s, strict=True, holder=holder))
                break
            except ConcurrencySlotAcquisitionError as exc:
                cause = exc.__cause__
                if not (isinstance(cause, httpx.HTTPStatusError) and cause.response.status_code == 423):
                    raise
                waited = time.monotonic() - started
                if timeout_s is not None and waited >= timeout_s:
                    raise LockTimeout(
                        f"lock {name!r} is held by another run (Prefect global concurrency limit {limit!r}; its holder "
                        f"shows under Concurrency in the Prefect UI); waited {waited:.1f} s — wait until that run finishes "
                        f"and try again; a killed holder's slot is freed when its lease runs out (within {lease_s:.0f} s)",
                        name, waited) from None
                time.sleep(poll_s if timeout_s is None else min(poll_s, max(timeout_s - waited, 0.001)))
        yield


def _ensure_limit(limit: str) -> None:
    """Create the global concurrency limit ``limit`` (1 slot) unless it exists; put a changed one back to 1 active slot."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
    from prefect.settings import get_current_settings

    key = (str(get_current_settings().api.url), limit)
    if key in _known_limits:
        return
    with get_client(sync_client=True) as client:
        try:
            found = client.read_global_concurrency_limit_by_name(limit)
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=limit, limit=1))
            except ObjectAlreadyExists:  # another process created it first
                pass
        else:
            if found.limit != 1 or not found.active:  # a lock must have exactly one slot
                client.update_global_concurrency_limit(limit, GlobalConcurrencyLimitUpdate(limit=1, active=True))
    _known_limits.add(key)


def _prefect_holder():
    """The task or flow run taking the lock, for Prefect's record of who holds a slot."""
    from prefect.client.schemas.objects import ConcurrencyLeaseHolder
    from prefect.context import FlowRunContext, TaskRunContext

    task_run = TaskRunContext.get()
    if task_run is not None:
        return ConcurrencyLeaseHolder(type="task_run", id=task_run.task_run.id)
    flow_run = FlowRunContext.get()
    if flow_run is not None and flow_run.flow_run is not None:
        return ConcurrencyLeaseHolder(type="flow_run", id=flow_run.flow_run.id)
    return None
