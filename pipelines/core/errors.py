"""The error types that mean "bad input or environment": shown as one clear line, exit code 2."""
from __future__ import annotations

import sys

# Where each user-facing error type lives. Looked up only in modules already imported: an exception
# can only be of a type whose module has been loaded, and a failing run should not pay for importing
# torch and ray just to print its error.
USER_ERRORS = {
    "pipelines.core.cli": "ConfigError",
    "pipelines.suites.base": "SuiteError",
    "models.encoders.base": "EncoderError",
    "orchestrator.storage.feature_cache": "FeatureCacheError",
    "orchestrator.storage.store": "StoreError",
    "orchestrator.storage.suite_features": "FeaturesError",
    "orchestrator.cluster": "ClusterError",
    "orchestrator.farm": "FarmError",
    "orchestrator.train": "TrainError",
    "pipelines.zeroshot.data": "ZeroShotError",
}


def user_errors() -> tuple[type[BaseException], ...]:
    """The user-facing error types among the modules loaded so far."""
    return tuple(getattr(sys.modules[m], name) for m, name in USER_ERRORS.items() if m in sys.modules)
