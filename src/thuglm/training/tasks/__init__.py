"""The training tasks `thuglm train` knows, by the name the config's `task:` gives.

A new task is one file in this folder with a `Task` subclass (base.py says what it provides), registered with
`@register_task`, and imported below so that it registers.
"""

from __future__ import annotations

from .base import Task

TASKS: dict[str, type[Task]] = {}


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator: `task: <cls.name>` in a config trains with `cls`."""
    if cls.name in TASKS:
        raise ValueError(f"two tasks are named {cls.name!r}: {TASKS[cls.name].__name__} and {cls.__name__}")
    TASKS[cls.name] = cls
    return cls


def get_task(name: str) -> type[Task]:
    try:
        return TASKS[name]
    except KeyError:
        raise KeyError(f"no task named {name!r}; known: {', '.join(sorted(TASKS))}") from None


from . import causal_lm, classification, dpo  # noqa: F401  (each registers its tasks)

__all__ = ["TASKS", "Task", "get_task", "register_task"]
