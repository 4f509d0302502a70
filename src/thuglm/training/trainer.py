"""`GlmTrainer`: the transformers Trainer with all of thuglm's parts (training/parts/), as `thuglm train` runs it."""

from __future__ import annotations

import torch
from transformers import Trainer

from ..models.losses import perplexity
from .parts import (
    AdapterCastingOff,
    AtomicCheckpoints,
    FaithfulSaving,
    ModuleWalksOnce,
    NonFiniteGuard,
    OptimizerInBackward,
    TokenCounting,
)
from .ptuning import prefix_counts_as_adapter


class GlmTrainer(
    OptimizerInBackward,  # before NonFiniteGuard: the guard checks the norm the backward hooks measured
    NonFiniteGuard,
    TokenCounting,
    AdapterCastingOff,
    ModuleWalksOnce,
    AtomicCheckpoints,
    FaithfulSaving,
    Trainer,
):
    """The Trainer with every part of training/parts/ (their docstrings say what each does), and `eval_perplexity`
    = exp(eval_loss) in every evaluation of a language model.

    `on_nan`: "stop" or "skip" (`NonFiniteGuard`); `optimizer_in_backward` (`OptimizerInBackward`) cannot skip a
    step whose update it has already applied, so the two together are refused.
    """

    def __init__(self, *args, on_nan: str = "stop", optimizer_in_backward: bool = False, **kwargs):
        if optimizer_in_backward and on_nan == "skip":  # the config refuses it too, with the fix
            raise ValueError("on_nan='skip' cannot skip an update that optimizer_in_backward has already applied")
        with prefix_counts_as_adapter(kwargs.get("model", args[0] if args else None)):  # P-Tuning on a k-bit base
            super().__init__(*args, on_nan=on_nan, optimizer_in_backward=optimizer_in_backward, **kwargs)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "eval_loss" in logs and self.compute_metrics is None:  # a language model's loss; classifiers have metrics
            logs["eval_perplexity"] = perplexity(logs["eval_loss"])
        super().log(logs, start_time)


def peak_memory() -> tuple[float, str]:
    """Peak memory in GiB and what was measured: CUDA tensors on a GPU, the process's resident set on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30, "cuda_max_memory_allocated"
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "cpu_max_rss"
