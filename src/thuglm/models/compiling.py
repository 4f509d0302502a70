"""Small arithmetic fused by torch.compile on a GPU: one compiled graph per function, shared by all its callers."""

from __future__ import annotations

from collections.abc import Callable

import torch

_compiled: dict[Callable, Callable] = {}


def compiled(fn: Callable) -> Callable:
    """`fn` compiled once for this process. dynamic=True: one graph for every shape, so calls with tensors of other
    sizes (a loss chunk's length, each weight matrix of an optimizer) do not recompile."""
    if fn not in _compiled:
        _compiled[fn] = torch.compile(fn, dynamic=True)
    return _compiled[fn]
