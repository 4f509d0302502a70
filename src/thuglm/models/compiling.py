"""Small arithmetic fused by torch.compile on a GPU: one compiled graph per function, shared by all its callers."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import torch

logger = logging.getLogger(__name__)

_compiled: dict[Callable, Callable] = {}
_guarded: dict[Callable, Callable] = {}


def compiled(fn: Callable) -> Callable:
    """`fn` compiled once for this process. dynamic=True: one graph for every shape, so calls with tensors of other
    sizes (a loss chunk's length, each weight matrix of an optimizer) do not recompile."""
    if fn not in _compiled:
        _compiled[fn] = torch.compile(fn, dynamic=True)
    return _compiled[fn]


def compiled_or_eager(fn: Callable) -> Callable:
    """`compiled(fn)`, or `fn` as written from the first call whose compilation fails (one warning, then no more
    tries): a GPU the compiler cannot serve (no Triton, an unsupported architecture) costs speed, not the run.
    Running out of memory is not a compiler failure and is raised as is."""
    if fn not in _guarded:
        fast, failed = compiled(fn), False

        @functools.wraps(fn)
        def call(*args, **kwargs):
            nonlocal failed
            if not failed:
                try:
                    return fast(*args, **kwargs)
                except torch.OutOfMemoryError:
                    raise
                except Exception as error:  # noqa: BLE001  (whatever the compiler raises; the eager call re-raises
                    failed = True          # the function's own errors)
                    logger.warning("compiling %s failed (%s: %s); running it as written from now on",
                                   fn.__qualname__, type(error).__name__, str(error).splitlines()[0] if str(error) else "")
            return fn(*args, **kwargs)

        _guarded[fn] = call
    return _guarded[fn]
