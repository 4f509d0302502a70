"""`thuglm train`: one linear recipe from a config to a trained model.

    config -> tokenizer -> datasets -> base model -> LoRA / full / freeze / P-Tuning -> Trainer -> outputs in output_dir

The steps are the same for every task; what each means (which rows, which model and head, which batches, metrics and
trainer) is the task's (training/tasks/, by the config's `task:`).

Outputs: the adapter in peft's format (LoRA) or the whole model as safetensors, the tokenizer files,
`thuglm_train.yaml` (the resolved config), `trainer_state.json`, `metrics.json`, `loss.png`, TensorBoard logs under
`runs/`, and `checkpoint-N/` folders to resume from.
"""

from __future__ import annotations

import logging
import math
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml

from ..models.folders import check_model_folder, check_tokenizer_fits, tokenizer_folder
from ..models.losses import perplexity
from .activation_checkpointing import training_argument_fields
from .batch_size import automatic_batch_rows, find_batch_size, longest_row
from .checkpoints import (
    check_output_dir,
    latest_complete_checkpoint,
    remove_stale_staging,
    staging_root,
    start_afresh,
)
from .config import (
    ConfigError,
    TrainConfig,
    check_max_seq_len,
    check_optimizer_placement,
    load_config,
    long_context_kwargs,
)
from .distributed import (
    data_parallel_size,
    fsdp_checkpoints_layers,
    main_process_first,
    process_state,
    quiet_replicas,
    sharding_plugin,
)
from .interrupts import TrainingInterrupted, interrupted_message, stop_on_signals
from .methods import (
    compile_blocks,
    count_parameters,
    prepare_for_method,
    resolve_model_dir,
    resolve_precision,
    weights_dtype,
)
from .optim import Adafactor
from .parts import close_progress_bar
from .quantization import check_official_quantized_base, quantized_load_kwargs
from .quantization import describe as describe_quantization
from .reporting import plot_losses, write_json
from .tasks import get_task
from .trainer import GlmTrainer, peak_memory

logger = logging.getLogger("thuglm.train")


def train_from_cli(config_path: str, overrides: list[str]) -> int:
    """Entry point of `thuglm train`; user errors (`ThuglmError`) reach `thuglm.cli.main`, which prints them."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    train(load_config(config_path, overrides))
    return 0


def train(config: TrainConfig) -> dict[str, Any] | None:
    """Train as `config` says and return the metrics written to metrics.json (None: the run to resume had already
    finished, and nothing was done)."""
    from transformers import AutoConfig, AutoTokenizer, set_seed

    import thuglm  # noqa: F401  (registers ChatGLM with the Auto classes)

    set_seed(config.seed)
    state = process_state()  # one process, or one of several under torchrun / accelerate launch
    quiet_replicas(state)
    processes = data_parallel_size(state)
    precision = resolve_precision(config.precision)
    attn_implementation = resolve_attention(config)
    choose_attention_kernels(attn_implementation)
    sharding = sharding_plugin()
    check_optimizer_placement(config, processes, precision, sharding)
    # QLoRA: the 4-/8-bit base's loading arguments; a missing bitsandbytes stops here (training/quantization.py)
    load_kwargs = quantized_load_kwargs(config, precision)
    if config.compile and sharding:
        raise ConfigError(f"`compile: true` compiles whole layers, and under {sharding} each process holds "
                          "shards of them; it is measured on one GPU and with DDP only: set compile: false here")
    # Everything the user could have got wrong is checked before anything is computed or written.
    check_output_dir(Path(config.output_dir), resuming=config.resume_from_checkpoint is not False,
                     overwrite=config.overwrite_output_dir)
    resume = resolve_resume(config)
    probe_batch_size = config.batch_size == "auto" and not resume
    if config.batch_size == "auto":
        rows_per_process = automatic_batch_rows(config, processes, sharding)
        if resume:  # the micro-batch the run was trained with, so that it goes on as it went
            config.batch_size = checkpoint_batch_size(resume)
    # A global batch the processes cannot share stops here (with batch_size auto: once the batch size is found).
    accumulation = None if probe_batch_size else config.gradient_accumulation_for(processes)
    task = get_task(config.task)(config)
    with main_process_first(state):  # the tiny model and the datasets cache are built once, then read by the others
        model_dir = resolve_model_dir(config.model)
        check_model_folder(model_dir)  # config, weights and tokenizer, as `thuglm chat` checks them
        base_config = AutoConfig.from_pretrained(model_dir)
        check_max_seq_len(config, base_config)  # before any data is read
        long_context = long_context_kwargs(config, base_config)  # rope_scaling: the base's context stretched
        check_official_quantized_base(model_dir, config)  # an official int4/int8 folder trains P-Tuning only
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder(model_dir))
        check_tokenizer_fits(tokenizer, model_dir)

        train_dataset, eval_dataset = task.build_datasets(tokenizer)
    if resume:
        done, planned = checkpoint_step(resume), planned_steps(config, train_dataset, processes, accumulation)
        if done >= planned:  # the Trainer would train one step more (or none) and overwrite metrics.json
            logger.info("%s finished at step %d of %d (%s): nothing to resume, nothing changed; to train longer, "
                        "raise max_steps or epochs and resume again", config.output_dir, done, planned,
                        Path(resume).name)
            return None
        logger.info("resuming from %s (step %d of %d)", resume, done, planned)
    # Before the model: under `accelerate launch` with DeepSpeed ZeRO-3 this makes from_pretrained load into shards.
    args = None if probe_batch_size else training_arguments(config, precision, eval_dataset is not None, accumulation)

    model = task.load_model(model_dir, weights_dtype(config.method, precision), attn_implementation,
                            **load_kwargs, **long_context)
    if long_context:
        logger.info("rope_scaling %s: rows of up to %d tokens, the rotary's positions divided by %g (recorded in the "
                    "saved folders)", config.rope_scaling, config.max_seq_len, model.config.rope_factor)
    model = prepare_for_method(model, config)
    if config.precision == "fp8":  # the frozen base's matmuls in FP8 (training/fp8.py), before compile fuses them
        from .fp8 import convert_base_to_fp8

        convert_base_to_fp8(model)
    # No KV cache while training (and in batch_size auto's probe): FSDP's activation checkpointing recomputes each
    # ChatGLMBlock in the backward pass, and a cache filled in the forward pass would grow a second time there; a
    # compiled layer would recompile for each layer's cache until torch.compile's limit, then run eager. The saved
    # model keeps its setting.
    use_cache, model.config.use_cache = model.config.use_cache, False
    if config.compile:
        compiled = compile_blocks(model, gradient_checkpointing=config.gradient_checkpointing,
                                  fixed_length=config.packing)
        logger.info("compile: %d layers compiled on first use (the first steps take longer)", compiled)
    if probe_batch_size:  # on the device this process trains on
        config.batch_size = find_batch_size(
            model, task.collator(tokenizer, model), longest_row(train_dataset), rows_per_process, device=state.device,
            optimizer=config.optimizer, precision=precision, gradient_checkpointing=config.gradient_checkpointing,
        )
        accumulation = config.gradient_accumulation_for(processes)
        logger.info("batch_size auto: %d rows a micro-batch, %d accumulated a step (global_batch_size %d)",
                    config.batch_size, accumulation, config.global_batch_size)
        args = training_arguments(config, precision, eval_dataset is not None, accumulation)
    trainable, total = count_parameters(model)
    logger.info("%s: training %s of %s parameters (%s, %s, %s)", model_dir, f"{trainable:,}", f"{total:,}",
                config.method, precision, describe_optimizer(config))
    if load_kwargs:
        logger.info("%s", describe_quantization(config, precision))
    if config.optimizer_in_backward:  # max_grad_norm is 0 then (the config refuses more)
        logger.info("max_grad_norm: off (optimizer_in_backward never holds all the gradients to clip their norm; "
                    "Adafactor caps the RMS of each weight's update instead)")

    output_dir = Path(config.output_dir)
    trainer = task.make_trainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=task.collator(tokenizer, model),
        compute_metrics=task.compute_metrics(),
        processing_class=tokenizer,
        optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(config),
        optimizer_in_backward=config.optimizer_in_backward,
        on_nan=config.on_nan,
    )
    output_dir.mkdir(parents=True, exist_ok=True)
    if state.is_main_process:
        remove_stale_staging(output_dir)  # a save that a killed run did not finish
        if config.overwrite_output_dir and not resume:
            start_afresh(output_dir)
        write_resolved_config(config, model_dir, precision, output_dir / "thuglm_train.yaml")

    with stop_on_signals():
        try:
            result = trainer.train(resume_from_checkpoint=resume)
            model.config.use_cache = use_cache
            if trainer.is_fsdp_enabled:  # sharded checkpoints are for resuming; the trained model is one file
                trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
            trainer.save_final_model(output_dir)
            if trainer.is_world_process_zero():
                task.save_beside_model(model, output_dir)
            if eval_dataset is not None and not _evaluated_at(trainer.state.log_history, trainer.state.global_step):
                trainer.evaluate()
        except KeyboardInterrupt:
            raise interrupted(trainer, output_dir, state.is_main_process) from None
    trainer.save_state()

    metrics = task.final_metrics(run_metrics(trainer, result, trainable, total, config, precision),
                                 trainer.state.log_history)
    if trainer.is_world_process_zero():
        write_json(metrics, output_dir / "metrics.json")
        plot_losses(trainer.state.log_history, output_dir / "loss.png", title=f"{config.method} · {model_dir.name}")
    logger.info("done: %s", ", ".join(f"{k}={v}" for k, v in metrics.items() if k in SUMMARY_KEYS))
    logger.info("outputs in %s (loss.png, metrics.json)", output_dir)
    return metrics


SUMMARY_KEYS = ("final_train_loss", "eval_loss", "perplexity", "tokens_per_s")


def checkpoint_step(checkpoint: str) -> int:
    """The optimizer steps a checkpoint was saved after."""
    return checkpoint_state(checkpoint).global_step


def checkpoint_batch_size(checkpoint: str) -> int:
    """The micro-batch (rows a process) a checkpoint's run was trained with."""
    return checkpoint_state(checkpoint).train_batch_size


def checkpoint_state(checkpoint: str):
    from transformers import TrainerState

    return TrainerState.load_from_json(str(Path(checkpoint) / "trainer_state.json"))


def planned_steps(config: TrainConfig, train_dataset, processes: int, accumulation: int) -> int:
    """The optimizer steps the run takes in all: max_steps, or the epochs over the training rows counted as the
    Trainer counts them (`Trainer.set_initial_training_values`: each process takes ceil(rows / (batch x processes))
    batches an epoch, the last accumulation of an epoch may be short). Streaming needs max_steps."""
    if config.max_steps > 0:
        return config.max_steps
    batches = math.ceil(len(train_dataset) / (config.batch_size * processes))
    steps_per_epoch = max(math.ceil(batches / accumulation), 1)
    return math.ceil(config.epochs * steps_per_epoch)


def interrupted(trainer: GlmTrainer, output_dir: Path, is_main_process: bool) -> BaseException:
    """What a Ctrl-C (or SIGTERM) ends the run with: the half-written save, if any, removed; on the main process one
    line naming the checkpoint to resume from; the other processes leave quietly with the same status."""
    if not is_main_process:
        return SystemExit(TrainingInterrupted.exit_status)
    close_progress_bar(trainer)
    shutil.rmtree(staging_root(output_dir), ignore_errors=True)  # never a checkpoint: those appear by a rename
    return TrainingInterrupted(interrupted_message(trainer.state.global_step, latest_complete_checkpoint(output_dir)))


def resolve_resume(config: TrainConfig) -> str | None:
    """`true` means the newest checkpoint in output_dir; a path must be a checkpoint folder."""
    value = config.resume_from_checkpoint
    if value is False:
        return None
    if value is True:
        last = latest_complete_checkpoint(Path(config.output_dir))
        if last is None:
            raise ConfigError(
                f"resume_from_checkpoint: true, but {config.output_dir} has no checkpoint-N folder to resume from; "
                "set it to false to start afresh, or to a checkpoint folder"
            )
        return last
    if not Path(value).is_dir():
        raise ConfigError(f"config key `resume_from_checkpoint`: {value} is not a checkpoint folder")
    return str(value)


def optimizer_cls_and_kwargs(config: TrainConfig) -> tuple[type[torch.optim.Optimizer], dict[str, Any]] | None:
    """The Trainer's `optimizer_cls_and_kwargs`: None keeps its AdamW.

    The Trainer builds the parameter groups (weight_decay for weight matrices, none for biases and LayerNorms, as
    for AdamW) and passes them with these keyword arguments; its LR scheduler then drives each group's lr.
    """
    if config.optimizer == "adamw":
        return None
    return Adafactor, {"lr": config.learning_rate, "weight_decay": config.weight_decay}


def describe_optimizer(config: TrainConfig) -> str:
    return f"{config.optimizer}{' in the backward pass' if config.optimizer_in_backward else ''}"


FLEX_ATTENTION_CAPABILITY = (8, 0)  # Ampere and later: where flex_attention's compiled kernels were measured


def resolve_attention(config: TrainConfig) -> str:
    """The attention implementation `attn_implementation: auto` stands for here (any other value is kept).

    flex_attention where packed rows go through layers compiled (its kernel is generated inside the layer's graph)
    without gradient checkpointing, on a GPU of compute capability 8.0+: for GLM's packed prefix-LM mask SDPA falls
    back to its memory-efficient kernel, which computes every masked block, while flex_attention skips them (the b16
    LoRA step measured faster; benchmarks/README.md, issue #23). SDPA everywhere else: on a CPU torch has no
    flex_attention backward; uncompiled or with checkpointing flex_attention was not measured to pay; and unpacked
    rows, a new length each batch, measured slower with it (short rows leave few masked blocks to skip) and made the
    layers recompile more often (the block mask's shape changes with the length too).
    """
    if config.attn_implementation != "auto":
        return config.attn_implementation
    flex = (config.packing and config.compile and not config.gradient_checkpointing and torch.cuda.is_available()
            and torch.cuda.get_device_capability() >= FLEX_ATTENTION_CAPABILITY)
    chosen = "flex_attention" if flex else "sdpa"
    logger.info("attention: %s (attn_implementation auto)", chosen)
    return chosen


def choose_attention_kernels(attn_implementation: str) -> None:
    """On a GPU, SDPA without its cuDNN kernel, for this process.

    For GLM's explicit prefix mask SDPA picks cuDNN's attention, whose every call costs far more CPU time than GPU
    work, so the LoRA step became host-bound. With cuDNN off SDPA takes its memory-efficient kernel, at the same
    peak memory; the step's tokens/s before and after: benchmarks/README.md, "The recipe's LoRA step".
    """
    if attn_implementation == "sdpa" and torch.cuda.is_available():
        torch.backends.cuda.enable_cudnn_sdp(False)


def training_arguments(config: TrainConfig, precision: str, has_eval: bool, accumulation: int = 1):
    """`accumulation`: micro-batches a step in each process (`config.gradient_accumulation_for(processes)`);
    `batch_size` is per process."""
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=config.output_dir,
        max_steps=config.max_steps,
        num_train_epochs=config.epochs,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.eval_batch_size or config.batch_size,
        gradient_accumulation_steps=accumulation,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=config.warmup_ratio,  # a float below 1 is a fraction of the steps
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        logging_steps=config.logging_steps,
        logging_first_step=True,
        save_strategy="steps" if config.save_steps else "no",
        save_steps=config.save_steps or 500,  # unused with save_strategy "no", but the Trainer checks it
        save_total_limit=config.save_total_limit,
        # Evaluated every eval_steps (default save_steps); in any case once at the end (see run).
        eval_strategy="steps" if has_eval and (config.eval_steps or config.save_steps) else "no",
        eval_steps=config.eval_steps or config.save_steps or None,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        # Under an FSDP config with fsdp_activation_checkpointing, FSDP checkpoints the layers itself.
        **training_argument_fields(config.gradient_checkpointing and not fsdp_checkpoints_layers()),
        use_cpu=not torch.cuda.is_available(),  # without it, processes on a CPU machine would not form a DDP group
        # Every trainable parameter (LoRA, all, or the last layers) gets a gradient at every step: no search for
        # unused ones, which also keeps DDP and gradient checkpointing together.
        ddp_find_unused_parameters=False,
        report_to=config.report_to,
        # The Trainer's filter reads every micro-batch's loss on the host (a synchronisation); on_nan=stop already
        # stops at a non-finite loss, so only on_nan=skip needs it to keep a skipped step's loss out of the log.
        logging_nan_inf_filter=config.on_nan == "skip",
        seed=config.seed,
        data_seed=config.seed,
        remove_unused_columns=False,  # the collator needs attention_mask as it is (sample numbers)
    )


def write_resolved_config(config: TrainConfig, model_dir: Path, precision: str, out_file: Path) -> None:
    """The config as it ran: defaults filled in, so the run can be repeated from this file alone."""
    resolved = config.to_dict()
    resolved.update(
        model=str(model_dir) if config.model != "tiny" else "tiny",
        precision=run_precision(config, precision),
    )
    out_file.write_text(yaml.safe_dump(resolved, allow_unicode=True, sort_keys=False), encoding="utf-8")


def run_precision(config: TrainConfig, precision: str) -> str:
    """The precision a run records: `fp8` is a bf16 run (`precision`, what autocast and the weights take) whose
    frozen base multiplies in FP8, and is written as fp8 so that the recorded config repeats it."""
    return "fp8" if config.precision == "fp8" else precision


def _evaluated_at(log_history: list[dict], step: int) -> bool:
    return any("eval_loss" in entry and entry.get("step") == step for entry in log_history)


def run_metrics(trainer, result, trainable: int, total: int, config: TrainConfig, precision: str) -> dict[str, Any]:
    history = trainer.state.log_history
    train_losses = [entry["loss"] for entry in history if "loss" in entry]
    eval_losses = [entry["eval_loss"] for entry in history if "eval_loss" in entry]
    elapsed = max(result.metrics["train_runtime"], 1e-9)  # this session's training, without the final evaluation
    memory_gib, memory_kind = peak_memory()
    metrics = {
        "train_loss": trainer.run_train_loss(),  # every step of the run; the Trainer's forgets those before a resume
        "final_train_loss": train_losses[-1] if train_losses else None,
        "eval_loss": eval_losses[-1] if eval_losses else None,
        "perplexity": perplexity(eval_losses[-1]) if eval_losses else None,
        "steps": trainer.state.global_step,
        "train_tokens": int(trainer.state.num_input_tokens_seen or 0),
        "tokens_per_s": round(trainer.session_tokens / elapsed, 1),  # all processes together
        "train_runtime_s": round(elapsed, 2),
        "processes": trainer.args.world_size,
        # train_batch_size: batch_size x the GPUs of one process (DataParallel's, when it sees several)
        "global_batch_size": trainer.args.world_size * trainer.args.train_batch_size
        * trainer.args.gradient_accumulation_steps,
        "peak_memory_gib": round(memory_gib, 3),
        "peak_memory_kind": memory_kind,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "method": config.method,
        "precision": run_precision(config, precision),
        "skipped_nonfinite_steps": trainer.skipped_nonfinite_steps,
    }
    if metrics["perplexity"] is not None and not math.isfinite(metrics["perplexity"]):
        metrics["perplexity"] = None
    return metrics
