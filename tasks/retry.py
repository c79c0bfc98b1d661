"""Which task failures are worth a retry: transient I/O only, never a deterministic refusal."""

from __future__ import annotations

# A bad request, a missing file or alias, a refused move: the same inputs fail the same way again.
DETERMINISTIC = (ValueError, LookupError, FileNotFoundError, PermissionError, NotADirectoryError, IsADirectoryError)


def only_transient(task, task_run, state) -> bool:
    """Prefect ``retry_condition_fn``: retry a failed run unless its error is deterministic."""
    try:
        state.result()
    except DETERMINISTIC:
        return False
    except Exception:  # connection resets, timeouts, a busy store: worth another try
        return True
    return False
