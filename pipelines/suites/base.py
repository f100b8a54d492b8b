"""The task data model shared by every suite: a task is a question over images with candidate answers."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from models.errors import UserError

META_TRAIN = "meta_train"
META_TEST = "meta_test"
SPLITS = (META_TRAIN, META_TEST)


class SuiteError(UserError, ValueError):
    """Bad task-suite input (malformed file, missing image, empty suite); the message says how to fix it."""


@dataclass
class Task:
    """One task: a description, its candidate answers and its support/query samples.

    Samples are indices into the suite's `images` list; labels index into `answers`.
    `answer_prompts[i]` is the text whose embedding stands for answer i in the task network's logits.
    """

    id: str
    description: str
    answers: list[str]
    answer_prompts: list[str]
    split: str  # META_TRAIN or META_TEST
    support_images: np.ndarray  # int64 [n_support]
    support_labels: np.ndarray  # int64 [n_support]
    query_images: np.ndarray  # int64 [n_query]
    query_labels: np.ndarray  # int64 [n_query]
    concepts: tuple[str, ...] = ()  # concepts the description mentions (colours, shapes, templates)
    paraphrases: tuple[str, ...] = ()  # other wordings of the description, when the suite has them


@dataclass
class TaskSuite:
    """A named list of tasks over one shared list of image files (absolute paths)."""

    name: str
    images: list[str]
    tasks: list[Task]
    info: dict = field(default_factory=dict)  # how it was built: seed, split mode, held-out concepts

    def split(self, split: str) -> list[Task]:
        """The tasks of one meta-split."""
        return [t for t in self.tasks if t.split == split]
