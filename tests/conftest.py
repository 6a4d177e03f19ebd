"""Shared fixtures: each real component the tests talk to lives in its own module under
tests/fixtures/ (S3-compatible server, MLflow server, local Ray cluster)."""

import pkgutil
from pathlib import Path

pytest_plugins = [
    f"tests.fixtures.{m.name}"
    for m in pkgutil.iter_modules([str(Path(__file__).parent / "fixtures")])
]
