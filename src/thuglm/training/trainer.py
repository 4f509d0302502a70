"""The transformers Trainer, taught two things about ChatGLM training rows."""

from __future__ import annotations

import math
import time

import torch
from transformers import Trainer


class GlmTrainer(Trainer):
    """Counts real tokens and reports perplexity.

    * Packed rows carry sample numbers (1, 2, 3, ...) in `attention_mask`, so the Trainer's own "non_padding" count
      (the mask's sum) would overstate them; here a token is any position whose mask is non-zero. The running total
      lives in `state.num_input_tokens_seen`, so it is saved in checkpoints and survives a resume.
    * Every evaluation also logs `eval_perplexity` = exp(eval_loss); every training log the tokens/s since the
      previous one.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.session_tokens = 0
        self._last_log = (time.perf_counter(), 0)  # (time, session tokens) at the previous training log

    def training_step(self, model, inputs, num_items_in_batch=None):
        mask = inputs.get("attention_mask")
        tokens = int((mask != 0).sum()) if mask is not None else inputs["input_ids"].numel()
        self.session_tokens += tokens
        self.state.num_input_tokens_seen = int(self.state.num_input_tokens_seen or 0) + tokens
        return super().training_step(model, inputs, num_items_in_batch)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "eval_loss" in logs:
            logs["eval_perplexity"] = perplexity(logs["eval_loss"])
        if "loss" in logs:
            # Throughput since the previous log, so the number shows the speed now rather than a run-long average.
            now, tokens = time.perf_counter(), self.session_tokens
            logs["tokens_per_s"] = round((tokens - self._last_log[1]) / max(now - self._last_log[0], 1e-9), 1)
            self._last_log = (now, tokens)
        super().log(logs, start_time)


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else float("inf")


def peak_memory() -> tuple[float, str]:
    """Peak memory in GiB and what was measured: CUDA tensors on a GPU, the process's resident set on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30, "cuda_max_memory_allocated"
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "cpu_max_rss"
