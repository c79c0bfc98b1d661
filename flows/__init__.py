"""Prefect flows that compose ``tasks``."""

import tasks  # noqa: F401  (its environment defaults must precede Prefect's import)
