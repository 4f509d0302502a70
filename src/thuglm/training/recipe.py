"""`thuglm train`: one linear recipe from a config to a trained model.

    config -> tokenizer -> datasets -> base model -> LoRA / full / freeze -> Trainer -> outputs in output_dir

Outputs: the adapter in peft's format (LoRA) or the whole model as safetensors, the tokenizer files,
`thuglm_train.yaml` (the resolved config), `trainer_state.json`, `metrics.json`, `loss.png`, TensorBoard logs under
`runs/`, and `checkpoint-N/` folders to resume from.
"""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path
from typing import Any

import yaml

from ..data import (
    DataError,
    encode_alpaca_dataset,
    encode_text_dataset,
    guess_text_column,
    load_raw_dataset,
)
from ..data.collator import GlmCollator
from ..inference.loading import ModelLoadError, check_model_folder
from .config import ConfigError, TrainConfig, load_config
from .methods import (
    count_parameters,
    load_base_model,
    prepare_for_method,
    resolve_model_dir,
    resolve_precision,
    weights_dtype,
)
from .reporting import plot_losses, write_json
from .trainer import GlmTrainer, peak_memory, perplexity

logger = logging.getLogger("thuglm.train")

STREAM_SHUFFLE_BUFFER = 10_000


def train_from_cli(config_path: str, overrides: list[str]) -> int:
    """Entry point of `thuglm train`: user errors become one line and exit status 2."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        config = load_config(config_path, overrides)
        train(config)
    except (ConfigError, DataError, ModelLoadError) as error:
        print(f"thuglm: {error}", file=sys.stderr)
        return 2
    return 0


def train(config: TrainConfig) -> dict[str, Any]:
    """Train as `config` says and return the metrics written to metrics.json."""
    from transformers import AutoTokenizer, set_seed

    import thuglm  # noqa: F401  (registers ChatGLM with the Auto classes)

    set_seed(config.seed)
    precision = resolve_precision(config.precision)
    model_dir = resolve_model_dir(config.model)
    check_model_folder(model_dir)  # config, weights and tokenizer, as `thuglm chat` checks them
    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    train_dataset, eval_dataset = build_datasets(config, tokenizer)
    resume = resolve_resume(config)

    model = load_base_model(model_dir, weights_dtype(config.method, precision), config.attn_implementation)
    model = prepare_for_method(model, config)
    trainable, total = count_parameters(model)
    logger.info("%s: training %s of %s parameters (%s, %s)", model_dir, f"{trainable:,}", f"{total:,}",
                config.method, precision)

    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    write_resolved_config(config, model_dir, precision, output_dir / "thuglm_train.yaml")

    trainer = GlmTrainer(
        model=model,
        args=training_arguments(config, precision, has_eval=eval_dataset is not None),
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=GlmCollator(pad_token_id=tokenizer.pad_token_id),
        processing_class=tokenizer,
    )
    result = trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(str(output_dir))
    if eval_dataset is not None and not _evaluated_at(trainer.state.log_history, trainer.state.global_step):
        trainer.evaluate()
    trainer.save_state()

    metrics = run_metrics(trainer, result, trainable, total, config, precision)
    write_json(metrics, output_dir / "metrics.json")
    plot_losses(trainer.state.log_history, output_dir / "loss.png", title=f"{config.method} · {model_dir.name}")
    logger.info("done: %s", ", ".join(f"{k}={v}" for k, v in metrics.items() if k in SUMMARY_KEYS))
    logger.info("outputs in %s (loss.png, metrics.json)", output_dir)
    return metrics


SUMMARY_KEYS = ("final_train_loss", "eval_loss", "perplexity", "tokens_per_s")


def build_datasets(config: TrainConfig, tokenizer):
    """Training and evaluation rows from the configured files: eval_files, else a validation split, else none."""
    data = config.data
    def load(files):
        return load_raw_dataset(files, streaming=data.streaming, cache_dir=data.cache_dir, encoding=data.encoding)

    raw = load(data.files)
    raw_eval = load(data.eval_files) if data.eval_files else None
    if raw_eval is None and data.validation_split:
        split = raw.train_test_split(test_size=data.validation_split, seed=config.seed)
        raw, raw_eval = split["train"], split["test"]
    if data.streaming:
        raw = raw.shuffle(seed=config.seed, buffer_size=STREAM_SHUFFLE_BUFFER)

    def encode(dataset, files):
        if data.format == "alpaca":
            return encode_alpaca_dataset(
                dataset, tokenizer, max_seq_len=config.max_seq_len, packing=config.resolved_packing(),
                num_proc=data.num_proc,
            )
        column = guess_text_column(dataset.column_names or [], data.text_column, source=", ".join(files))
        return encode_text_dataset(
            dataset, tokenizer, text_column=column, max_seq_len=config.max_seq_len,
            packing=config.resolved_packing(), num_proc=data.num_proc,
        )

    train_dataset = encode(raw, data.files)
    eval_dataset = encode(raw_eval, data.eval_files or data.files) if raw_eval is not None else None
    if not data.streaming and len(train_dataset) == 0:
        raise DataError(f"no training rows in {', '.join(data.files)}: every text was empty")
    return train_dataset, eval_dataset


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


def latest_complete_checkpoint(output_dir: Path) -> str | None:
    """The newest checkpoint-N folder that was fully written.

    The Trainer writes trainer_state.json last, so a folder without it is what a run killed while saving left
    behind; resuming from it would fail, while the one before it is intact.
    """
    from transformers.trainer_utils import sort_checkpoints

    if not output_dir.is_dir():
        return None
    for folder in reversed(sort_checkpoints(str(output_dir))):
        if (Path(folder) / "trainer_state.json").is_file():
            return folder
        logger.warning("skipping %s: it was not completely written (the run stopped while saving it)", folder)
    return None


def training_arguments(config: TrainConfig, precision: str, has_eval: bool):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=config.output_dir,
        max_steps=config.max_steps,
        num_train_epochs=config.epochs,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.eval_batch_size or config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        learning_rate=config.resolved_learning_rate(),
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=config.warmup_ratio,  # a float below 1 is a fraction of the steps
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        logging_steps=config.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=config.eval_steps or config.save_steps,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        gradient_checkpointing=config.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        report_to=config.report_to,
        seed=config.seed,
        data_seed=config.seed,
        remove_unused_columns=False,  # the collator needs attention_mask as it is (sample numbers)
    )


def write_resolved_config(config: TrainConfig, model_dir: Path, precision: str, out_file: Path) -> None:
    """The config as it ran: defaults filled in, so the run can be repeated from this file alone."""
    resolved = config.to_dict()
    resolved.update(
        model=str(model_dir) if config.model != "tiny" else "tiny",
        precision=precision,
        learning_rate=config.resolved_learning_rate(),
        packing=config.resolved_packing(),
    )
    out_file.write_text(yaml.safe_dump(resolved, allow_unicode=True, sort_keys=False), encoding="utf-8")


def _evaluated_at(log_history: list[dict], step: int) -> bool:
    return any("eval_loss" in entry and entry.get("step") == step for entry in log_history)


def run_metrics(trainer, result, trainable: int, total: int, config: TrainConfig, precision: str) -> dict[str, Any]:
    history = trainer.state.log_history
    train_losses = [entry["loss"] for entry in history if "loss" in entry]
    eval_losses = [entry["eval_loss"] for entry in history if "eval_loss" in entry]
    elapsed = max(result.metrics["train_runtime"], 1e-9)  # this session's training, without the final evaluation
    memory_gib, memory_kind = peak_memory()
    metrics = {
        "train_loss": result.training_loss,
        "final_train_loss": train_losses[-1] if train_losses else None,
        "eval_loss": eval_losses[-1] if eval_losses else None,
        "perplexity": perplexity(eval_losses[-1]) if eval_losses else None,
        "steps": trainer.state.global_step,
        "train_tokens": int(trainer.state.num_input_tokens_seen or 0),
        "tokens_per_s": round(trainer.session_tokens / elapsed, 1),
        "train_runtime_s": round(elapsed, 2),
        "peak_memory_gib": round(memory_gib, 3),
        "peak_memory_kind": memory_kind,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "method": config.method,
        "precision": precision,
    }
    if metrics["perplexity"] is not None and not math.isfinite(metrics["perplexity"]):
        metrics["perplexity"] = None
    return metrics
