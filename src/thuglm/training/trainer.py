"""The transformers Trainer, taught two things about ChatGLM training rows."""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import time
from pathlib import Path

import torch
from accelerate.utils import DistributedType
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
from transformers import AutoConfig, Trainer
from transformers.trainer_callback import ExportableState, ProgressCallback, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from ..errors import ThuglmError
from .checkpoints import (
    latest_complete_checkpoint,
    publish,
    publish_files,
    staging_root,
    write_error,
    write_failure,
)
from .optim import Adafactor, step_in_backward
from .ptuning import prefix_counts_as_adapter, saving_prefix_only

logger = logging.getLogger("thuglm.train")


class NonFiniteLossError(ThuglmError):
    """The loss or the gradients became NaN / infinite and `on_nan` is `stop`."""


class GlmTrainer(Trainer):
    """Counts real tokens and reports perplexity.

    * Packed rows carry sample numbers (1, 2, 3, ...) in `attention_mask`, so the Trainer's own "non_padding" count
      (the mask's sum) would overstate them; here a token is any position whose mask is non-zero. The running total
      lives in `state.num_input_tokens_seen`, so it is saved in checkpoints and survives a resume.
    * `train_loss` is the mean loss of every step of the run, those before a resume included (`RunLoss` keeps the
      sum in each checkpoint); the Trainer's divides this session's losses by all the run's steps.
    * Every evaluation also logs `eval_perplexity` = exp(eval_loss); every training log the tokens/s since the
      previous one.

    The Trainer walks the whole module tree several times a step (`model.train()`, `model.zero_grad()`, the
    parameters to clip, the parameter count of its FLOP estimate): ~1,400 modules for LoRA on ChatGLM-6B, ~5 ms of
    Python a walk, on a host that the LoRA step on a GPU already keeps busy. Here the walks go over lists taken when
    training starts (`WalkShortcuts`), on one process and under DDP, where the tree does not change. Turning peft's
    casting of adapter inputs off for each forward (see `compute_loss_context_manager`) goes over a list of the
    adapter layers taken once, under every launcher.

    And two things about keeping a run safe:

    * checkpoints are written to a staging folder and renamed into place when complete (see `checkpoints.py`);
    * a NaN / infinite loss or gradient norm stops the run before the optimizer applies it (`on_nan="stop"`), so
      the newest checkpoint stays a good one, or that optimizer step is skipped and counted (`on_nan="skip"`).

    `optimizer_in_backward=True` (with `optimizer_cls_and_kwargs=(Adafactor, ...)`) hooks the optimizer into the
    backward pass (`optim.step_in_backward`): each weight is updated, and its gradient freed, as soon as the gradient
    is complete; the Trainer's `optimizer.step()` and `zero_grad()` then find no gradients and do nothing, and its
    LR scheduler sets the lr the hooks read, as usual. The hooks sum the squares of the gradients on the device, so
    the step's gradient norm is still logged and checked. The config refuses with it (`check_optimizer_in_backward`,
    `check_optimizer_placement`): gradient accumulation and clipping over all weights (no moment holds all the
    gradients), `on_nan="skip"` and fp16's loss scaling (the update is applied before anything could skip it), and
    several processes. A NaN / inf loss or gradient still stops the run, but after its update: the stop message says
    so, and nothing is saved after it.
    """

    def __init__(self, *args, on_nan: str = "stop", optimizer_in_backward: bool = False, **kwargs):
        if optimizer_in_backward and on_nan == "skip":  # the config refuses it too, with the fix
            raise ValueError("on_nan='skip' cannot skip an update that optimizer_in_backward has already applied")
        with prefix_counts_as_adapter(kwargs.get("model", args[0] if args else None)):  # P-Tuning on a k-bit base
            super().__init__(*args, **kwargs)
        self.session_tokens = 0
        # Tokens of this process since the last flush, counted on the device: reading the count every micro-batch
        # (and, under several processes, gathering it) stopped the host until the GPU had drained, each time.
        self._unflushed_tokens = torch.zeros((), dtype=torch.int64, device=self.args.device)
        self._unflushed_loss = torch.zeros((), dtype=torch.float64, device=self.args.device)  # of this process
        self.run_loss = RunLoss()
        self.add_callback(self.run_loss)
        self._last_log = (time.perf_counter(), 0)  # (time, session tokens) at the previous training log
        self.on_nan = on_nan
        self.skipped_nonfinite_steps = 0
        # A non-finite micro-batch loss since the last optimizer step (0: none; a non-finite loss is never 0), kept on
        # the device and read only by the one check each optimizer step makes (see _get_grad_norm).
        self._nonfinite_loss = torch.zeros((), device=self.args.device)
        self._staging: Path | None = None
        self.optimizer_in_backward = optimizer_in_backward
        self._backward_hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._grad_square_sum: torch.Tensor | None = None  # this step's, summed by the hooks
        # Under FSDP with bf16/fp16, accelerate upcasts the trained weights to fp32 (master copies for the optimizer);
        # the trained model is saved in the dtypes it was loaded in, as on one GPU and as ZeRO-3 gathers 16-bit ones.
        self._loaded_dtypes = {name: tensor.dtype for name, tensor in self.model.state_dict().items()}
        self._loaded_dtype = self.model.dtype
        # {lm_head.weight: transformer.word_embeddings.weight}: one tensor in the model, two in a gathered state dict.
        self._tied_weights = dict(getattr(self.model, "all_tied_weights_keys", None) or {})
        self._non_embedding_parameters: int | None = None  # for the FLOP estimate, counted once
        self._walks: WalkShortcuts | None = None  # on the model the training loop runs
        self._adapter_layers: tuple[PeftModel, list[BaseTunerLayer]] | None = None  # (model, its adapter layers)

    # ---- the optimizer inside the backward pass -----------------------------------------------------------------
    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        if self.optimizer_in_backward and not self._backward_hooks:  # the Trainer may call this again
            if not isinstance(optimizer, Adafactor):
                raise TypeError(f"optimizer_in_backward needs thuglm's Adafactor, not {type(optimizer).__name__}")
            self._backward_hooks = step_in_backward(optimizer, on_gradient=self._add_to_grad_norm)
        return optimizer

    def _add_to_grad_norm(self, grad: torch.Tensor) -> None:
        # On the device, without reading it back (no synchronisation in the backward pass); fp32 accumulation over
        # a bf16 gradient without an fp32 copy of it.
        square = torch.linalg.vector_norm(grad, dtype=torch.float32).square()
        self._grad_square_sum = square if self._grad_square_sum is None else self._grad_square_sum + square

    def _backward_grad_norm(self) -> torch.Tensor | None:
        norm = self._grad_square_sum.sqrt() if self._grad_square_sum is not None else None
        self._grad_square_sum = None
        return norm

    # ---- LoRA on a half-precision base ---------------------------------------------------------------------------
    def adapter_casting_off(self) -> contextlib.AbstractContextManager:
        """peft's casting of adapter inputs off, where the Trainer runs a LoRA model under autocast.

        peft copies each adapter's input to the fp32 of the adapter weights; under autocast the matmul casts it
        straight back to bf16/fp16, so for a half-precision base that is two passes over the largest activations of
        every adapted layer (for dense_4h_to_h, [tokens, 16384]) for nothing. Only where the Trainer runs the model
        (a training step, an evaluation), and only where accelerate runs it under autocast (`native_amp`; fp16 on a
        CPU has none, and there the fp16 input would meet the fp32 adapter): a PeftModel used on its own keeps
        peft's casting.
        """
        if self.accelerator.native_amp and isinstance(self.model, PeftModel):
            return adapter_input_casting_off(self._adapter_layers_of(self.model))
        return contextlib.nullcontext()

    def compute_loss_context_manager(self):
        """The Trainer's (autocast is accelerate's, around the forward), and peft's input casting off under it: for
        the forward of an evaluation, which has no backward (a training step turns it off for longer, see
        `training_step`)."""
        stack = super().compute_loss_context_manager()
        stack.enter_context(self.adapter_casting_off())
        return stack

    def _adapter_layers_of(self, model: PeftModel) -> list[BaseTunerLayer]:
        # peft's own `disable_input_dtype_casting` finds the adapter layers with two `named_modules()` walks per
        # micro-batch, ~5 ms of Python for LoRA on the 6B shape; the model's adapter layers do not change in a run.
        if self._adapter_layers is None or self._adapter_layers[0] is not model:
            self._adapter_layers = (model, adapter_layers(model))
        return self._adapter_layers[1]

    # ---- the training loop's walks over the module tree, each done once ------------------------------------------
    def _shortcut_walks(self, model: torch.nn.Module) -> None:
        if (self._walks is not None and self._walks.model is model) or self.accelerator.distributed_type not in (
            DistributedType.NO, DistributedType.MULTI_GPU, DistributedType.MULTI_CPU,
        ):  # FSDP and DeepSpeed give train() and zero_grad() meanings of their own
            return
        self._drop_walk_shortcuts()
        self._walks = WalkShortcuts(model)

    def _drop_walk_shortcuts(self) -> None:
        if self._walks is not None:
            self._walks.remove()
            self._walks = None

    def _clip_grad_norm(self, model):
        if self._walks is None or self._walks.model is not model:
            return super()._clip_grad_norm(model)
        return self.accelerator.clip_grad_norm_(self._walks.parameters, self.args.max_grad_norm)

    def floating_point_ops(self, inputs) -> int:
        """The Trainer's estimate, 6 x input tokens x non-embedding parameters, with the parameters counted once."""
        main_input = getattr(self.model, "main_input_name", "input_ids")
        if main_input not in inputs or not hasattr(self.model, "num_parameters"):
            return 0
        if self._non_embedding_parameters is None:
            self._non_embedding_parameters = self.model.num_parameters(exclude_embeddings=True)
        return 6 * inputs[main_input].numel() * self._non_embedding_parameters

    def training_step(self, model, inputs, num_items_in_batch=None):
        self._shortcut_walks(model)
        mask = inputs.get("attention_mask")
        tokens = (mask != 0).sum() if mask is not None else inputs["input_ids"].numel()
        self._unflushed_tokens += tokens
        # Over the forward and the backward alike: gradient checkpointing runs each layer's forward again inside the
        # backward, and a recomputation that cast adapter inputs to fp32 where the forward had not would save other
        # tensors than the forward did (torch's CheckpointError: "saved bfloat16, recomputed float32").
        with self.adapter_casting_off():
            loss = super().training_step(model, inputs, num_items_in_batch)
        loss_value = loss.detach().float()
        finite = torch.isfinite(loss_value)
        self._nonfinite_loss = torch.where(finite, self._nonfinite_loss, loss_value)
        self._unflushed_loss += torch.where(finite, loss_value, 0).double()  # the Trainer's tr_loss, without NaNs
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
        try:
            result = super().train(*args, **kwargs)
        finally:  # the model leaves the loop as it came, also when the run stops with an error
            self._drop_walk_shortcuts()
        self.flush_counts()
        return result

    # ---- NaN / inf: checked after the backward and the clipping, before the optimizer step (in-backward: after) --
    def _get_grad_norm(self, model, grad_norm=None):
        if self.optimizer_in_backward:  # the gradients are gone; the hooks measured them on the way
            grad_norm = self._backward_grad_norm()
        else:
            grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        # With fp16 an infinite gradient norm is the loss scaler's business (it skips the step and lowers the scale).
        bad = self._nonfinite_loss != 0
        if not self.args.fp16 and grad_norm is not None:
            norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP2: a DTensor
            bad |= ~torch.isfinite(torch.as_tensor(norm, device=self.args.device))
        # The step's one host-device synchronisation: whether to stop or skip must be known before the optimizer
        # step. Every process decides the same, so none is left waiting in a collective.
        if self.accelerator.reduce(bad.float(), reduction="sum").item():
            self._on_nonfinite(model, grad_norm)
        self._nonfinite_loss.zero_()
        return grad_norm

    def _on_nonfinite(self, model, grad_norm) -> None:
        step = self.state.global_step + 1
        loss = float(self._nonfinite_loss)
        what = f"the loss became {loss}" if loss != 0 else f"the gradient norm became {float(grad_norm)}"
        if self.on_nan == "skip":
            model.zero_grad(set_to_none=True)  # the optimizer skips parameters without a gradient
            self.skipped_nonfinite_steps += 1
            logger.warning("step %d: %s; skipped this optimizer step (%d skipped so far)", step, what,
                           self.skipped_nonfinite_steps)
            return
        self.close_progress_bar()
        last = latest_complete_checkpoint(Path(self.args.output_dir))
        kept = (f"{last} is the last good checkpoint: resume from it with resume_from_checkpoint=true after the fix"
                if last else "no checkpoint had been written yet")
        if self.optimizer_in_backward:  # the hooks have applied this step's update: say so, and save nothing more
            raise NonFiniteLossError(
                f"step {step}: {what}; optimizer_in_backward had already applied this step's update in the backward "
                f"pass, so the run stopped with spoiled weights in memory, which were not saved; {kept}. Lower "
                "learning_rate or look for broken rows in the data (on_nan=skip needs optimizer_in_backward: false)."
            )
        raise NonFiniteLossError(
            f"step {step}: {what}, so the run stopped before the optimizer applied it; {kept}. Lower learning_rate, "
            "use bf16 instead of fp16, or look for broken rows in the data; or set on_nan=skip to skip such steps."
        )

    def close_progress_bar(self) -> None:
        """End the progress bar's line, so that the error message that follows starts on a line of its own."""
        for callback in self.callback_handler.callbacks:
            bar = getattr(callback, "training_bar", None)
            if isinstance(callback, ProgressCallback) and bar is not None:
                bar.close()
                callback.training_bar = None

    # ---- atomic checkpoints ---------------------------------------------------------------------------------------
    def _get_output_dir(self, trial) -> str:
        # While a checkpoint is saved, the Trainer writes it under the staging folder (see _save_checkpoint).
        return str(self._staging) if self._staging is not None else super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        run_dir = Path(self._get_output_dir(trial))
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        self.flush_counts()  # the counts saved with the checkpoint, for a resumed run to go on from
        self._staging = staging_root(run_dir)
        try:
            super()._save_checkpoint(model, trial)
        except Exception as error:
            if (failure := write_failure(error)) is None:
                raise
            if self.args.should_save:
                shutil.rmtree(self._staging, ignore_errors=True)
            self.close_progress_bar()
            raise write_error(name, failure, run_dir, latest_complete_checkpoint(run_dir)) from error
        finally:
            self._staging = None
        self.accelerator.wait_for_everyone()  # every process has written its part (sharded FSDP states)
        if self.args.should_save:
            publish(staging_root(run_dir) / name, run_dir / name)
            shutil.rmtree(staging_root(run_dir), ignore_errors=True)
            # Only complete checkpoints carry the name, so the limit counts and keeps complete ones.
            rotate_checkpoints(
                output_dir=str(run_dir), save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
            )
        self.accelerator.wait_for_everyone()

    def save_final_model(self, output_dir: Path) -> None:
        """`save_model(output_dir)`, staged like a checkpoint: each file appears whole or not at all."""
        staged = staging_root(output_dir) / "final"
        try:
            self.save_model(str(staged))
        except Exception as error:
            if (failure := write_failure(error)) is None:
                raise
            if self.args.should_save:
                shutil.rmtree(staged, ignore_errors=True)
            last = latest_complete_checkpoint(output_dir)
            raise write_error("the trained model", failure, output_dir, last) from error
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            publish_files(staged, output_dir)
            shutil.rmtree(staging_root(output_dir), ignore_errors=True)
        self.accelerator.wait_for_everyone()

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        gathered = state_dict is not None  # under FSDP / DeepSpeed: the state dict gathered from the shards
        if gathered:
            state_dict = without_tied_copies(in_loaded_dtypes(state_dict, self._loaded_dtypes), self._tied_weights)
        with without_checkpoint_wrappers(self.model), saving_prefix_only(self.model):
            super()._save(output_dir, state_dict=state_dict)
        # save_pretrained records the dtype of the (upcast) weights it holds in config.json, not of those it wrote.
        config_file = Path(output_dir or self.args.output_dir) / "config.json"
        if gathered and config_file.is_file():
            config = AutoConfig.from_pretrained(config_file.parent)
            if config.dtype != self._loaded_dtype:
                config.dtype = self._loaded_dtype
                config.save_pretrained(config_file.parent)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "eval_loss" in logs and self.compute_metrics is None:  # a language model's loss; classifiers have metrics
            logs["eval_perplexity"] = perplexity(logs["eval_loss"])
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


class WalkShortcuts:
    """Gives `model` a `train()` and a `zero_grad()` that go over lists of its modules and parameters taken now,
    until `remove()`; `parameters` is the list, for clipping.

    Both are what torch's do as long as no module is added or removed: `train(mode)` still sets every module's mode
    when any differs (after an evaluation), through the model's own `train`; `zero_grad()` sets every gradient to
    None. They exist for the training loop, which calls both every step on a tree that does not change.
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.modules = list(model.modules())
        self.parameters = list(model.parameters())
        model.train, model.zero_grad = self.train, self.zero_grad  # instance attributes, found before the class's

    def train(self, mode: bool = True) -> torch.nn.Module:
        if any(module.training != mode for module in self.modules):
            type(self.model).train(self.model, mode)
        return self.model

    def zero_grad(self, set_to_none: bool = True) -> None:
        if not set_to_none:
            type(self.model).zero_grad(self.model, set_to_none)
            return
        for parameter in self.parameters:
            parameter.grad = None

    def remove(self) -> None:
        for name in ("train", "zero_grad"):
            self.model.__dict__.pop(name, None)


def adapter_layers(model: torch.nn.Module) -> list[BaseTunerLayer]:
    """The peft adapter layers (a LoRA-adapted Linear each) of `model`."""
    return [module for module in model.modules() if isinstance(module, BaseTunerLayer)]


@contextlib.contextmanager
def adapter_input_casting_off(layers: list[BaseTunerLayer]):
    """peft's `disable_input_dtype_casting` over a list of adapter layers taken once: each layer's casting is off
    inside, and as it was after."""
    was = [layer.cast_input_dtype_enabled for layer in layers]
    try:
        for layer in layers:
            layer.cast_input_dtype_enabled = False
        yield
    finally:
        for layer, enabled in zip(layers, was):
            layer.cast_input_dtype_enabled = enabled


@contextlib.contextmanager
def without_checkpoint_wrappers(model: torch.nn.Module):
    """The model with each activation-checkpoint wrapper (FSDP's `fsdp_activation_checkpointing` puts one around every
    ChatGLMBlock) replaced by the module it wraps, for the duration of a save.

    peft finds a LoRA adapter's weights by the names of its modules, which run through the wrapper
    (`layers.0._checkpoint_wrapped_module.attention...`), while the state dict's keys do not (torch strips the
    wrapper's name from them): peft 0.21 then matches no key and writes an empty adapter_model.safetensors. Nothing
    runs forward or backward during a save, so the wrappers can step aside and come back.
    """
    swapped = []
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, CheckpointWrapper):
                swapped.append((parent, name, child))
    try:
        for parent, name, wrapper in swapped:
            parent._modules[name] = wrapper._checkpoint_wrapped_module
        yield model
    finally:
        for parent, name, wrapper in swapped:
            parent._modules[name] = wrapper


def in_loaded_dtypes(state_dict: dict[str, torch.Tensor], loaded: dict[str, torch.dtype]) -> dict[str, torch.Tensor]:
    """`state_dict` with each floating tensor back in the dtype its weight was loaded in (a gathered FSDP state dict
    holds the fp32 master copies of bf16 weights: twice the file, and not the model that was asked for)."""
    cast = {}
    for name, tensor in state_dict.items():
        dtype = loaded.get(name.replace("_checkpoint_wrapped_module.", ""))
        if dtype is not None and tensor.is_floating_point() and dtype.is_floating_point and tensor.dtype != dtype:
            tensor = tensor.to(dtype)
        cast[name] = tensor
    return cast


def without_tied_copies(state_dict: dict[str, torch.Tensor], tied: dict[str, str]) -> dict[str, torch.Tensor]:
    """`state_dict` without the copies of tied weights (target -> source). save_pretrained drops a tied weight only
    when both names share one tensor, which those gathered from FSDP's shards do not: ChatGLM-6B's 1 GiB lm_head would
    be written twice. Loading ties it back to the embedding, as for the official checkpoint."""
    return {name: tensor for name, tensor in state_dict.items() if not (name in tied and tied[name] in state_dict)}


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else float("inf")


def peak_memory() -> tuple[float, str]:
    """Peak memory in GiB and what was measured: CUDA tensors on a GPU, the process's resident set on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30, "cuda_max_memory_allocated"
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "cpu_max_rss"
