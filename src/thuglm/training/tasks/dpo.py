"""`task: dpo`: preference tuning on pairs of a chosen and a rejected answer (DPO, IPO, ORPO, SimPO).

    ranking rows -> (chosen, rejected) samples laid out as SFT samples -> one forward of 2B rows -> per-sequence
    log-probs (TRL's fused LM head) -> TRL's loss of the loss_type -> the GlmTrainer step

What comes from TRL, and why not its `DPOTrainer` whole: `DPOTrainer` tokenizes with a chat template into
prompt + completion with 1D positions; ChatGLM-6B needs its own layout (`prompt [gMASK] <sop> answer <eop>`, 2D
positions that depend on where [gMASK] and <sop> sit) and thuglm's Trainer parts (NaN guard, atomic checkpoints, real
token counts), and ORPO and SimPO are not `DPOTrainer` losses but other trainers (`trl.experimental.orpo` / `cpo`). So
thuglm takes TRL's parts: `add_fused_lm_head` gives the per-token log-probs of the labels straight from the hidden
states in chunks (never the [tokens, 130,528] logits), and the losses are TRL's own: `ORPOTrainer.odds_ratio_loss`
and `CPOTrainer.cpo_loss` (SimPO) are called as functions, and DPO's sigmoid and IPO losses, which `DPOTrainer`
computes inline, are its two lines (tests/training/test_dpo.py checks all four against hand computation).

The reference model (sigmoid, ipo): for LoRA and QLoRA, the base with the adapter switched off (peft's
`disable_adapter()`), in the same step, no second copy; for full and freeze, the reference log-probs of every pair
are computed once before training with the model as loaded and kept as two columns of the rows (no second 12 GB copy
of ChatGLM-6B, no second forward in each step; a resumed run computes them again from the same base). ORPO and SimPO
need no reference.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import warnings
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from peft import PeftModel, TaskType

from ...data import DataError
from ...data.collator import GlmCollator
from ...data.preference import REFERENCE_COLUMNS, PreferenceCollator, encode_pairs
from ...data.sources import load_source
from ...models.losses import IGNORE_INDEX
from ..config import ConfigError, TrainConfig, data_spec
from ..trainer import GlmTrainer
from . import register_task
from .base import Task, split_off_evaluation

logger = logging.getLogger("thuglm.train")

REFERENCE_LOSSES = ("sigmoid", "ipo")
"""The loss types that compare the policy with a reference model; orpo and simpo need none."""
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected")
"""Logged as TRL's trainers name them (eval_-prefixed in evaluations)."""


def preference_loss(
    loss_type: str, beta: float, chosen_logps: torch.Tensor, rejected_logps: torch.Tensor,
    chosen_tokens: torch.Tensor, rejected_tokens: torch.Tensor, ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None, simpo_gamma: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(the batch's loss, chosen rewards [B], rejected rewards [B]) from per-sequence summed log-probs [B] of the
    answers (and of the reference model's, for sigmoid and ipo), and the answers' token counts [B]."""
    if loss_type in REFERENCE_LOSSES:
        if ref_chosen_logps is None or ref_rejected_logps is None:
            raise ValueError(f"loss_type {loss_type!r} compares with a reference model: pass its log-probs")
        chosen_ratios = chosen_logps - ref_chosen_logps
        rejected_ratios = rejected_logps - ref_rejected_logps
        if loss_type == "sigmoid":  # trl DPOTrainer._compute_loss, loss_type "sigmoid"
            losses = -F.logsigmoid(beta * (chosen_ratios - rejected_ratios))
        else:  # "ipo": the same, its log-ratios averaged over each answer's tokens, as TRL does (and IPO's authors)
            delta = chosen_ratios / chosen_tokens.clamp(min=1) - rejected_ratios / rejected_tokens.clamp(min=1)
            losses = (delta - 1 / (2 * beta)) ** 2
        return losses.mean(), beta * chosen_ratios.detach(), beta * rejected_ratios.detach()
    # ORPO and SimPO score an answer by its mean log-prob a token (TRL's average_log_prob=True for both).
    chosen_mean = chosen_logps / chosen_tokens.clamp(min=1)
    rejected_mean = rejected_logps / rejected_tokens.clamp(min=1)
    settings = _trl_loss_settings(loss_type, beta, simpo_gamma, chosen_logps.device)
    if loss_type == "orpo":
        ORPOTrainer = experimental_trl("orpo").ORPOTrainer
        ratio_losses, chosen_rewards, rejected_rewards, _, _ = ORPOTrainer.odds_ratio_loss(settings, chosen_mean,
                                                                                           rejected_mean)
        # ORPOTrainer: the chosen answers' NLL (over all their tokens) minus the odds-ratio term.
        nll = -chosen_logps.sum() / chosen_tokens.sum().clamp(min=1)
        return nll - ratio_losses.mean(), chosen_rewards, rejected_rewards
    if loss_type == "simpo":
        CPOTrainer = experimental_trl("cpo").CPOTrainer
        losses, chosen_rewards, rejected_rewards = CPOTrainer.cpo_loss(settings, chosen_mean, rejected_mean)
        return losses.mean(), chosen_rewards, rejected_rewards  # SimPO proper: cpo_alpha 0, no NLL term
    raise ValueError(f"unknown loss_type {loss_type!r}; known: sigmoid, ipo, orpo, simpo")


def experimental_trl(name: str):
    """`trl.experimental.<name>`, imported without TRL's notice that experimental APIs may change: that notice is for
    whoever writes the import (thuglm pins the TRL versions it is tested with), not for a user who chose a loss."""
    from trl.import_utils import TRLExperimentalWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TRLExperimentalWarning)
        return importlib.import_module(f"trl.experimental.{name}")


def _trl_loss_settings(loss_type: str, beta: float, simpo_gamma: float, device: torch.device) -> SimpleNamespace:
    """What TRL's ORPO / CPO loss methods read from their trainer (`self`): its settings, and the device."""
    return SimpleNamespace(loss_type=loss_type, beta=beta, simpo_gamma=simpo_gamma, label_smoothing=0.0, alpha=0.0,
                           accelerator=SimpleNamespace(device=device))


def sequence_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probs of each row's labels, the labels counted) [rows], through TRL's fused LM head (added by
    `Dpo.load_model`): the logits are made and dropped in chunks inside it."""
    labels = batch["labels"]
    outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    position_ids=batch.get("position_ids"), labels=labels, fused_lm_head=True)
    counted = labels[:, 1:] != IGNORE_INDEX  # the head scores token t + 1 from position t
    return outputs.log_probs.float().sum(dim=-1), counted.sum(dim=-1)


class PreferenceTrainer(GlmTrainer):
    """GlmTrainer (NaN guard, atomic checkpoints, token counts, resume) with a preference loss over batches of 2B
    rows, the B chosen answers then the B rejected ones (`PreferenceCollator`).

    The metrics are summed on the device at every micro-batch and read once a log (a `.item()` a metric a micro-batch,
    as TRL's trainers do, would stop the host each time); over several processes they are summed over all of them.
    """

    def __init__(self, *args, preference, **kwargs):
        super().__init__(*args, **kwargs)
        self.preference = preference
        # compute_loss gives each micro-batch's mean: the Trainer divides it by the accumulation steps itself.
        self.model_accepts_loss_kwargs = False
        self._metric_sums = {mode: torch.zeros(len(METRICS) + 1, dtype=torch.float64, device=self.args.device)
                             for mode in ("train", "eval")}
        self.reference = None
        if preference.loss_type in REFERENCE_LOSSES:
            self.reference = "adapter off" if isinstance(self.model, PeftModel) else "precomputed"
        if self.reference == "precomputed" and (self.is_fsdp_enabled or self.is_deepspeed_enabled):
            raise ConfigError(f"`dpo.loss_type: {preference.loss_type}` without an adapter computes the reference "
                              "log-probs with the whole model before training, and FSDP / DeepSpeed hold it in shards "
                              "until then: use method: lora (the base with the adapter off is the reference), "
                              "loss_type orpo or simpo (no reference), or one GPU / DDP (thuglm train --nproc N)")
        if self.reference == "precomputed":
            self.train_dataset = self.with_reference_logps(self.train_dataset, "training")
            if self.eval_dataset is not None:
                self.eval_dataset = self.with_reference_logps(self.eval_dataset, "evaluation")

    @torch.no_grad()
    def with_reference_logps(self, dataset, what: str):
        """`dataset` with the reference model's summed log-probs of both answers of every pair, from the model as it
        was loaded (before any step, and before a resumed run loads its checkpoint), in eval mode."""
        loader = torch.utils.data.DataLoader(dataset, batch_size=self.args.per_device_eval_batch_size,
                                             collate_fn=self.data_collator, shuffle=False)
        model, was_training = self.model, self.model.training
        model.eval()
        values = {name: [] for name in REFERENCE_COLUMNS}
        try:
            for batch in loader:
                batch = self._prepare_inputs(batch)
                with self.compute_loss_context_manager():
                    logps, _ = sequence_logps(model, batch)
                for name, part in zip(REFERENCE_COLUMNS, logps.chunk(2)):
                    values[name].extend(part.tolist())
        finally:
            model.train(was_training)
        logger.info("reference log-probs of the %d %s pairs computed with the model as loaded", len(dataset), what)
        for name, column in values.items():
            dataset = dataset.add_column(name, column)
        return dataset

    def reference_logps(self, model, inputs) -> tuple[torch.Tensor, torch.Tensor] | tuple[None, None]:
        if self.reference == "precomputed":
            return inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        if self.reference is None:
            return None, None
        # The base is the reference: the same model with the adapter off (peft's switch is on the PeftModel; the
        # forward goes through the wrapper DDP or FSDP put around it, which shards or syncs what it holds).
        with torch.no_grad(), self.accelerator.unwrap_model(model).disable_adapter():
            logps, _ = sequence_logps(model, inputs)
        return logps.chunk(2)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        ref_chosen, ref_rejected = self.reference_logps(model, inputs)  # first: no graph of the policy held meanwhile
        logps, tokens = sequence_logps(model, inputs)
        chosen, rejected = logps.chunk(2)
        chosen_tokens, rejected_tokens = tokens.chunk(2)
        settings = self.preference
        loss, chosen_rewards, rejected_rewards = preference_loss(
            settings.loss_type, settings.beta, chosen, rejected, chosen_tokens, rejected_tokens, ref_chosen,
            ref_rejected, simpo_gamma=settings.simpo_gamma,
        )
        self._add_metrics("train" if model.training else "eval", chosen_rewards, rejected_rewards, chosen, rejected)
        return (loss, None) if return_outputs else loss

    def _add_metrics(self, mode, chosen_rewards, rejected_rewards, chosen_logps, rejected_logps) -> None:
        """Add a micro-batch's pairs to the sums of the metrics, on the device; a pair with a NaN / inf in it (a step
        that `on_nan: skip` leaves out) is left out of them too."""
        values = torch.stack([chosen_rewards, rejected_rewards, chosen_logps.detach(), rejected_logps.detach()]).double()
        finite = torch.isfinite(values).all(dim=0)
        chosen, rejected, chosen_logps, rejected_logps = torch.where(finite, values, 0.0)
        self._metric_sums[mode] += torch.stack([
            chosen.sum(), rejected.sum(), ((chosen > rejected) & finite).double().sum(), (chosen - rejected).sum(),
            chosen_logps.sum(), rejected_logps.sum(), finite.double().sum(),
        ]).to(self._metric_sums[mode].device)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """The loss (and the metrics' sums) of an evaluation batch; no logits, no perplexity: the loss is not over
        tokens."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "eval" if "eval_loss" in logs else "train" if "loss" in logs else None
        if mode is not None:  # every process logs at the same steps and evaluations: a collective is safe here
            sums = self.accelerator.reduce(self._metric_sums[mode].clone(), reduction="sum").tolist()
            self._metric_sums[mode].zero_()
            if sums[-1]:
                prefix = "eval_" if mode == "eval" else ""
                logs.update({f"{prefix}{name}": value / sums[-1] for name, value in zip(METRICS, sums)})
        # GlmTrainer's own log adds exp(eval_loss) as a perplexity; a preference loss is not one: its parts' logs only.
        super(GlmTrainer, self).log(logs, start_time)


@register_task
class Dpo(Task):
    name = "dpo"
    peft_task_type = TaskType.CAUSAL_LM
    reports_perplexity = False  # the loss is over pairs, not tokens

    @classmethod
    def check_config(cls, config: TrainConfig) -> None:
        data, settings = config.data, config.dpo
        if data.format not in ("alpaca", "sharegpt"):
            raise ConfigError(f"`task: dpo` trains on pairs of answers: set data.format to alpaca (instruction, input, "
                              f"chosen, rejected) or sharegpt (conversations, chosen, rejected), not {data.format}")
        if data.sources:
            raise ConfigError("`task: dpo` reads one ranking dataset: name its files in data.files, not data.sources")
        if data.columns.response:
            raise ConfigError("`task: dpo` trains on data.columns.chosen and data.columns.rejected, not "
                              "data.columns.response: map the two answers instead")
        for key, value in (("packing", config.packing), ("data.streaming", data.streaming),
                           ("data.train_on_prompt", data.train_on_prompt)):
            if value:
                raise ConfigError(f"`task: dpo` compares the answers of each pair laid out alone: set `{key}: false`")
        if config.method == "ptuning":
            raise ConfigError("`task: dpo` with `method: ptuning` is not supported: there is no base to compare with "
                              "once a prefix is in place; use method: lora (the base with the adapter off is the "
                              "reference), full or freeze")
        if settings.beta <= 0:
            raise ConfigError(f"config key `dpo.beta` must be above 0; got {settings.beta}")
        if importlib.util.find_spec("trl") is None:
            raise ConfigError("`task: dpo` takes its log-probs and losses from TRL, which is not installed: "
                              "pip install \"thuglm[dpo]\"")

    def build_datasets(self, tokenizer):
        """Pairs from data.files (and data.eval_files, or a validation split): every ranking row read, or skipped and
        counted as `data.on_bad_row` says (an empty answer, chosen equal to rejected)."""
        config, data = self.config, self.config.data
        spec = dataclasses.replace(data_spec(data, data.files), ranking=True)
        read = {"cache_dir": data.cache_dir, "bad_rows": data.on_bad_row, "num_proc": data.num_proc}
        encode = {"max_seq_len": config.max_seq_len, "num_proc": data.num_proc}
        rows, held_out = split_off_evaluation(load_source(spec, **read), config)
        train_dataset = encode_pairs(rows, tokenizer, source=spec.describe(), **encode)
        eval_dataset = None
        if data.eval_files:
            eval_spec = spec.reading(data.eval_files)
            eval_dataset = encode_pairs(load_source(eval_spec, **read), tokenizer, source=eval_spec.describe(),
                                        **encode)
        elif held_out is not None:
            eval_dataset = encode_pairs(held_out, tokenizer, source=spec.describe(), **encode)
        if len(train_dataset) == 0:
            raise DataError(f"no training pairs in {spec.describe()}: every row was skipped (see the warnings above)")
        return train_dataset, eval_dataset

    def load_model(self, model_dir, dtype, attn_implementation, **load_kwargs):
        from trl.trainer.utils import add_fused_lm_head

        model = super().load_model(model_dir, dtype, attn_implementation, **load_kwargs)
        # `model(..., labels=labels, fused_lm_head=True).log_probs`: per-token log-probs of the labels, computed from
        # the hidden states in chunks (never the [tokens, 130,528] logits); before peft wraps the model, as TRL asks.
        add_fused_lm_head(model)
        return model

    def collator(self, tokenizer, model):
        return PreferenceCollator(GlmCollator.for_model(tokenizer.pad_token_id, model.config))

    def make_trainer(self, **trainer_kwargs):
        return PreferenceTrainer(preference=self.config.dpo, **trainer_kwargs)

    def final_metrics(self, metrics, log_history):
        """The common metrics (no perplexity), the last training log's rewards / log-probs and the last evaluation's."""
        metrics = super().final_metrics(metrics, log_history)
        for prefix in ("", "eval_"):
            last = next((entry for entry in reversed(log_history) if f"{prefix}rewards/accuracies" in entry), None)
            if last is not None:
                metrics.update({f"{prefix}{name}": last[f"{prefix}{name}"] for name in METRICS})
        return metrics
