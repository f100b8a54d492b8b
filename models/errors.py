"""The base class of every error the user can fix (bad input, config or environment).

It lives in the lowest layer, with no imports, so models, orchestrator and pipelines can all
subclass it and a CLI can catch it without importing torch or ray.
"""
from __future__ import annotations


class UserError(Exception):
    """An error the user can fix; its message says what was wrong and how to fix it.

    CLIs print it as one line `error: ...` and exit 2 (`pipelines.core.cli.guarded`).
    """
