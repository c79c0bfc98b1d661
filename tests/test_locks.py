"""Exclusive locks: flock files (threads and processes) and Prefect global concurrency limits (a real test server)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tasks.locks import LockTimeout, exclusive, lock_backend, safe_name
from tasks.settings import ErasureSettings

REPO = Path(__file__).resolve().parents[1]


def _race(name: str, settings: ErasureSettings, workers: int = 3, rounds: int = 3, hold_s: float = 0.05) -> list[tuple[float, float]]:
    """Threads taking ``name`` in turn; returns every (entered, left) interval."""
    intervals: list[tuple[float, float]] = []
    errors: list[BaseException] = []
    start = threading.Barrier(workers)

    def work() -> None:
        try:
            start.wait()
            for _ in range(rounds):
                with exclusive(name, settings, timeout_s=60, poll_s=0.01):
                    entered = time.monotonic()
                    time.sleep(hold_s)
                    intervals.append((entered, time.monotonic()))
        except BaseException as exc:  # reported below: a thread's exception would vanish otherwise
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    return sorted(intervals)


def _assert_no_overlap(intervals: list[tuple[float, float]], expected: int) -> None:
    assert len(intervals) == expected
    for (_, left), (entered, _) in zip(intervals, intervals[1:]):
        assert entered >= left, f"two holders at once: one left at {left}, the next entered at {entered}"


@pytest.fixture
def file_settings(tmp_path):
    return ErasureSettings(home=tmp_path / "home", locks="file")


def test_file_lock_lets_one_thread_in_at_a_time(file_settings):
    _assert_no_overlap(_race("model:shapes-clip", file_settings), expected=9)
    assert (file_settings.home / "locks" / "model.shapes-clip.lock").is_file()


def test_file_lock_timeout_says_who_holds_it(file_settings):
    with exclusive("request:req-1", file_settings):
        started = time.monotonic()
        with pytest.raises(LockTimeout) as caught:
            with exclusive("request:req-1", file_settings, timeout_s=0):
                pytest.fail("a held lock was taken twice")
        assert time.monotonic() - started < 0.5  # 0 tries once
        message = str(caught.value)
        assert "'request:req-1'" in message and f"process {os.getpid()}" in message and "waited 0.0 s" in message
        assert "wait until that run finishes" in message and caught.value.holder["pid"] == os.getpid()
        with pytest.raises(LockTimeout, match=r"waited 0\.[3-9]"):
            with exclusive("request:req-1", file_settings, timeout_s=0.3, poll_s=0.05):
                pass
        with exclusive("request:req-2", file_settings, timeout_s=0):  # another name is another lock
            pass
    with exclusive("request:req-1", file_settings, timeout_s=0):  # released on exit
        pass


def test_file_lock_is_released_when_the_block_raises(file_settings):
    with pytest.raises(RuntimeError):
        with exclusive("model:m", file_settings):
            raise RuntimeError("boom")
    with exclusive("model:m", file_settings, timeout_s=0):
        pass


_PROCESS_HOLDER = """
import sys, time
from tasks.locks import exclusive
from tasks.settings import ErasureSettings
settings = ErasureSettings(home=sys.argv[1], locks="file")
with exclusive("model:shared", settings, timeout_s=60, poll_s=0.01):
    print(f"{time.monotonic()} enter", flush=True)
    time.sleep(0.3)
    print(f"{time.monotonic()} exit", flush=True)
"""


def test_file_lock_excludes_other_processes(file_settings):
    holders = [subprocess.Popen([sys.executable, "-c", _PROCESS_HOLDER, str(file_settings.home)], cwd=REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}) for _ in range(2)]
    outputs = [holder.communicate(timeout=120) for holder in holders]
    assert all(holder.returncode == 0 for holder in holders), [err for _, err in outputs]
    intervals = sorted(tuple(float(line.split()[0]) for line in out.splitlines()) for out, _ in outputs)  # monotonic is system-wide
    _assert_no_overlap(intervals, expected=2)


def test_lock_names_become_safe_file_names():
    assert safe_name("request:req-1") == "request.req-1"
    odd = safe_name("model:team/clip model")
    assert "/" not in odd and " " not in odd and odd != safe_name("model:team_clip_model")


def test_bad_arguments_are_refused(file_settings):
    with pytest.raises(ValueError, match="lock name is empty"):
        with exclusive(" ", file_settings):
            pass
    with pytest.raises(ValueError, match="timeout_s"):
        with exclusive("x", file_settings, timeout_s=-1):
            pass


@pytest.mark.usefixtures("prefect_harness")
def test_prefect_lock_lets_one_thread_in_at_a_time(tmp_path):
    from prefect.client.orchestration import get_client

    auto = ErasureSettings(home=tmp_path / "home")
    assert lock_backend(auto) == "prefect"  # the harness sets PREFECT_API_URL
    assert lock_backend(auto.model_copy(update={"locks": "file"})) == "file"
    settings = auto.model_copy(update={"locks": "prefect"})
    name = f"model:prefect-race-{os.getpid()}-{time.monotonic_ns()}"
    _assert_no_overlap(_race(name, settings, workers=2, rounds=2, hold_s=0.2), expected=4)
    with get_client(sync_client=True) as client:
        limit = client.read_global_concurrency_limit_by_name(f"clip-erasure.{safe_name(name)}")
    assert (limit.limit, limit.active, limit.active_slots) == (1, True, 0)
    assert not (tmp_path / "home" / "locks").exists()  # no file lock was taken

    with exclusive(name, settings):
        with pytest.raises(LockTimeout, match="Prefect global concurrency limit") as caught:
            with exclusive(name, settings, timeout_s=0):
                pytest.fail("a held Prefect lock was taken twice")
        assert repr(name) in str(caught.value) and "lease runs out" in str(caught.value)
    with exclusive(name, settings, timeout_s=0):  # released on exit
        pass
