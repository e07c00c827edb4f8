"""Embedded tasks for training small language models, generated on the fly (nothing downloaded).

Every task has ``name``, ``vocab_size``, ``seq_len`` and
``sample(batch_size, generator=None, device=None) -> (input_ids, labels)``, both int64
``[batch_size, seq_len]`` and deterministic given the generator's state. Labels follow the
causal-LM convention: the loss is ``cross_entropy(logits[:, :-1], labels[:, 1:],
ignore_index=-100)``; a scored label equals the input token at its position, every other label
(always position 0) is -100.
"""

from __future__ import annotations

import inspect
from typing import Any

from ._base import IGNORE_INDEX, Task, shifted_accuracy
from .copy_task import Copy
from .dyck import Dyck
from .mqar import MQAR
from .parity import Parity
from .text import Text

__all__ = ["IGNORE_INDEX", "MQAR", "TASKS", "Copy", "Dyck", "Parity", "Task", "Text", "make_task", "shifted_accuracy"]

TASKS: dict[str, type[Task]] = {"mqar": MQAR, "copy": Copy, "parity": Parity, "dyck": Dyck, "text": Text}


def make_task(name: str, **kwargs: Any) -> Task:
    """The task registered as ``name`` in ``TASKS``, built with ``kwargs``."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    accepted = [p for p in inspect.signature(TASKS[name]).parameters if p != "self"]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise TypeError(f"task {name!r} takes {', '.join(accepted)}; got unknown argument(s) {', '.join(unknown)}")
    return TASKS[name](**kwargs)
