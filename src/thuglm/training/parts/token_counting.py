"""Real token counts, tokens/s in the logs, and the run's mean loss across resumes."""

from __future__ import annotations

import time

import torch
from transformers.trainer_callback import ExportableState, TrainerCallback


class TokenCounting:
    """Counts real tokens and keeps the run's loss.

    * Packed rows carry sample numbers (1, 2, 3, ...) in `attention_mask`, so the Trainer's own "non_padding" count
      (the mask's sum) would overstate them; here a token is any position whose mask is non-zero. The running total
      lives in `state.num_input_tokens_seen`, so it is saved in checkpoints and survives a resume; `session_tokens`
      counts this session's.
    * `train_loss` is the mean loss of every step of the run, those before a resume included (`RunLoss` keeps the
      sum in each checkpoint); the Trainer's divides this session's losses by all the run's steps. Non-finite losses
      (a step a NaN guard skipped) are left out.
    * Every training log carries the tokens/s since the previous one.

    The counts stay on the device between logs: reading them every micro-batch (and, under several processes,
    gathering them) would stop the host until the GPU had drained, each time.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.session_tokens = 0
        self._unflushed_tokens = torch.zeros((), dtype=torch.int64, device=self.args.device)
        self._unflushed_loss = torch.zeros((), dtype=torch.float64, device=self.args.device)  # of this process
        self.run_loss = RunLoss()
        self.add_callback(self.run_loss)
        self._last_log = (time.perf_counter(), 0)  # (time, session tokens) at the previous training log

    def training_step(self, model, inputs, num_items_in_batch=None):
        mask = inputs.get("attention_mask")
        self._unflushed_tokens += (mask != 0).sum() if mask is not None else inputs["input_ids"].numel()
        loss = super().training_step(model, inputs, num_items_in_batch)
        loss_value = loss.detach().float()
        self._unflushed_loss += torch.where(torch.isfinite(loss_value), loss_value, 0).double()
        return loss

    def flush_counts(self) -> None:
        """Add the tokens counted on the devices since the last flush to `session_tokens` and
        `state.num_input_tokens_seen` (summed over the processes), and their losses to `run_loss` (the mean over the
        processes, as the Trainer logs them). A collective: every process calls it, at each training log, before each
        checkpoint and at the end of training."""
        local = torch.stack([self._unflushed_tokens.double(), self._unflushed_loss])
        tokens, loss = self.accelerator.gather(local.reshape(1, 2)).sum(dim=0).tolist()
        self._unflushed_tokens.zero_()
        self._unflushed_loss.zero_()
        self.session_tokens += int(tokens)
        self.state.num_input_tokens_seen = int(self.state.num_input_tokens_seen or 0) + int(tokens)
        self.run_loss.loss_sum += loss / self.accelerator.num_processes

    def run_train_loss(self) -> float:
        """The mean loss of the run's steps so far, those trained before a resume included."""
        return self.run_loss.loss_sum / max(self.state.global_step, 1)

    def train(self, *args, **kwargs):
        result = super().train(*args, **kwargs)
        self.flush_counts()
        return result

    def _save_checkpoint(self, model, trial) -> None:
        self.flush_counts()  # the counts saved with the checkpoint, for a resumed run to go on from
        super()._save_checkpoint(model, trial)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "train_loss" in logs:  # the Trainer's summary at the end of training, on every process
            self.flush_counts()
            logs["train_loss"] = self.run_train_loss()
        if "loss" in logs:
            self.flush_counts()  # every process logs the training loss at the same steps
            # Throughput since the previous log, so the number shows the speed now rather than a run-long average.
            now, tokens = time.perf_counter(), self.session_tokens
            logs["tokens_per_s"] = round((tokens - self._last_log[1]) / max(now - self._last_log[0], 1e-9), 1)
            self._last_log = (now, tokens)
        super().log(logs, start_time)


class RunLoss(TrainerCallback, ExportableState):
    """The sum of the run's step losses, saved in each checkpoint's trainer_state.json (`stateful_callbacks`) and
    taken back from it when a run resumes: the Trainer's own sum starts again at 0 in every session."""

    def __init__(self, loss_sum: float = 0.0):
        self.loss_sum = loss_sum

    def state(self) -> dict:
        return {"args": {}, "attributes": {"loss_sum": self.loss_sum}}

    def on_train_begin(self, args, state, control, **kwargs):
        # The state is the checkpoint's when the run resumes; a fresh run's holds this callback's own (0).
        saved = state.stateful_callbacks.get(type(self).__name__)
        self.loss_sum = float(saved["attributes"]["loss_sum"]) if isinstance(saved, dict) else 0.0
