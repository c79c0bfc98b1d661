"""Fixtures for real local services (S3 via SeaweedFS, MLflow, Prefect), loaded by conftest.py."""
