"""Task suites: the built-in `easyvqa` and `procedural` suites and the user's JSONL task file."""
from __future__ import annotations

import inspect

from .base import META_TEST, META_TRAIN, SPLITS, SuiteError, Task, TaskSuite
from .easyvqa import load_easyvqa
from .procedural import load_procedural
from .taskfile import read_task_file, write_task_file

SUITES = ("easyvqa", "procedural")
_LOADERS = {"easyvqa": load_easyvqa, "procedural": load_procedural}

__all__ = [
    "META_TEST", "META_TRAIN", "SPLITS", "SUITES", "SuiteError", "Task", "TaskSuite",
    "load_easyvqa", "load_procedural", "load_suite", "read_task_file", "write_task_file",
]


def _params(fn) -> set[str]:
    return set(inspect.signature(fn).parameters) - {"path"}


def load_suite(name: str, tasks_file: str | None = None, **kwargs) -> TaskSuite:
    """Load a suite by name, or the user's task file when `tasks_file` is set."""
    # A stage config carries every suite's arguments, so each loader takes the ones it knows; a name
    # that no loader knows is a typo and fails loudly.
    known = set().union(*(_params(f) for f in (*_LOADERS.values(), read_task_file)))
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise SuiteError(f"unknown suite argument(s) {unknown}; valid: {', '.join(sorted(known))}")
    if tasks_file is not None:
        fn = read_task_file
        return fn(tasks_file, **{k: v for k, v in kwargs.items() if k in _params(fn)})
    if name not in _LOADERS:
        raise SuiteError(f"unknown suite {name!r}; valid: {', '.join(SUITES)} (or pass tasks_file=...)")
    fn = _LOADERS[name]
    return fn(**{k: v for k, v in kwargs.items() if k in _params(fn)})
