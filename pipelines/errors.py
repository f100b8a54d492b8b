"""The error types that mean "bad input or environment": shown as one clear line, exit code 2."""
from __future__ import annotations


def user_errors() -> tuple[type[BaseException], ...]:
    """Collected lazily so importing the CLI does not import every backend."""
    from models.encoders import EncoderError
    from orchestrator.cluster import ClusterError
    from orchestrator.store import StoreError
    from orchestrator.suite_features import FeaturesError
    from pipelines.cli import ConfigError
    from pipelines.suites import SuiteError

    return (ConfigError, SuiteError, EncoderError, StoreError, FeaturesError, ClusterError)
