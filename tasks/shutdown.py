"""Stop requests (SIGTERM, Ctrl-C) that never cut a promotion in half.

``erasure serve`` stops its flow runs with SIGTERM. Outside a critical section a run stops at once
(SystemExit unwinds it: its attempt is recorded failed and retryable, its locks and lease end, the
champion is untouched). Inside one (moving the aliases and recording the outcome) the signal is
held until the section ends, so a promotion is either complete or never started.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from contextlib import contextmanager
from typing import Iterator

logger = logging.getLogger(__name__)
_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_state = {"depth": 0, "deferred": None, "installed": False}


def _on_signal(signum, frame) -> None:
    if _state["depth"]:
        _state["deferred"] = signum
        logger.warning("%s received during a promotion: stopping once it is recorded", signal.Signals(signum).name)
        return
    raise SystemExit(128 + signum)


def install(force: bool = False) -> bool:
    """Handle SIGTERM/SIGINT as above in a flow-run process started by a Prefect runner or worker
    (or anywhere with ``force``). False (nothing done) elsewhere, e.g. in a test process or off the
    main thread, whose own signal handling stays as it was."""
    if _state["installed"]:
        return True
    if not (force or os.environ.get("PREFECT__FLOW_RUN_ID")) or threading.current_thread() is not threading.main_thread():
        return False
    for sig in _SIGNALS:
        signal.signal(sig, _on_signal)
    _state["installed"] = True
    return True


@contextmanager
def critical(what: str) -> Iterator[None]:
    """Hold stop signals while the block runs; a held one stops the process after it."""
    _state["depth"] += 1
    try:
        yield
    finally:
        _state["depth"] -= 1
        if not _state["depth"] and _state["deferred"] is not None:
            signum, _state["deferred"] = _state["deferred"], None
            logger.warning("stopping after %s (%s)", what, signal.Signals(signum).name)
            raise SystemExit(128 + signum)
