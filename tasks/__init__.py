"""Prefect tasks over the ``unlearning`` library (I/O, logging, MLflow, S3)."""

import os

# A run without PREFECT_API_URL starts a throwaway local server; its first start in a new
# PREFECT_HOME migrates a database, which took over Prefect's 20 s default on 2 busy cores.
# Set before Prefect reads its settings; a value the user exported wins.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
