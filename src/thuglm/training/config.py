"""The training config: typed dataclasses read from one YAML file plus `key=value` overrides.

    model: path/to/chatglm-6b          # or `tiny`, the built-in demo model
    method: lora                       # lora | full | freeze
    data:
      files: [data/*.csv]
      text_column: content
    lora: {r: 8, alpha: 16}

Every key is checked: an unknown key or a value of the wrong type is a `ConfigError` that names the key and, for a
misspelling, its closest valid spelling. Defaults are chosen so that a config needs only `model` and `data.files`.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ..data.samples import DEFAULT_MAX_SEQ_LEN
from ..errors import ThuglmError

DEFAULT_LORA_TARGETS = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]


class ConfigError(ThuglmError, ValueError):
    """A config the user must fix: the message names the key and what is accepted."""


@dataclass
class ColumnsConfig:
    """Which column of the files plays which role (LLaMA-Factory's `columns`); left out: the format's default."""

    prompt: str | None = None
    """alpaca: the instruction (default `instruction`); text: the text column (as data.text_column)."""
    query: str | None = None
    """alpaca: the input added to the instruction on a new line (default `input`)."""
    response: str | None = None
    """alpaca: the answer trained (default `output`)."""
    history: str | None = None
    """alpaca: earlier [query, response] rounds (default `history`)."""
    system: str | None = None
    """alpaca, sharegpt: a system text for the whole dialogue (default `system`), put before the first query."""
    messages: str | None = None
    """sharegpt: the list of messages (default `conversations`; `messages` and `conversation` found by themselves)."""
    chosen: str | None = None
    """`task: dpo`, alpaca and sharegpt: the preferred answer (default `chosen`; sharegpt: one message, or text)."""
    rejected: str | None = None
    """`task: dpo`, alpaca and sharegpt: the answer preferred less (default `rejected`)."""

    def given(self) -> dict[str, str]:
        return {name: value for name, value in dataclasses.asdict(self).items() if value is not None}


@dataclass
class TagsConfig:
    """Keys and role names inside sharegpt messages (LLaMA-Factory's `tags`); left out: from / value / human / gpt /
    system, and OpenAI's role / content / user / assistant / system are recognised in each row by themselves."""

    role_tag: str | None = None
    content_tag: str | None = None
    user_tag: str | None = None
    assistant_tag: str | None = None
    system_tag: str | None = None
    observation_tag: str | None = None
    """A tool's output (LLaMA-Factory's `observation`): a row with one is skipped and counted, not trained."""
    function_tag: str | None = None
    """A tool call (LLaMA-Factory's `function_call`): a row with one is skipped and counted, not trained."""

    def given(self) -> dict[str, str]:
        return {name: value for name, value in dataclasses.asdict(self).items() if value is not None}


DATA_FORMATS = ("text", "alpaca", "sharegpt")
FORMAT_COLUMNS = {"text": ("prompt",),
                  "alpaca": ("prompt", "query", "response", "history", "system", "chosen", "rejected"),
                  "sharegpt": ("messages", "system", "chosen", "rejected")}
RANKING_ROLES = ("chosen", "rejected")  # read by `task: dpo` only


@dataclass
class SourceConfig:
    """One dataset of a mixture (`data.sources`); a key left out takes the `data.` key of the same name (columns and
    tags only when the format is the same)."""

    files: list[str] = field(default_factory=list)
    format: Literal["text", "alpaca", "sharegpt"] | None = None
    columns: ColumnsConfig | None = None
    tags: TagsConfig | None = None
    text_column: str | None = None
    field: str | None = None
    txt_unit: Literal["line", "paragraph", "document"] | None = None
    encoding: str | None = None
    weight: float | None = None
    """Interleave the sources' samples with probabilities in proportion to their weights (until every source has
    given all its samples); no weight on any source: all samples of all sources, once each."""
    max_samples: int | None = None
    """Only the first N rows of this source."""


@dataclass
class DataConfig:
    files: list[str] = field(default_factory=list)
    """Files, folders or globs of .csv / .tsv / .json / .jsonl / .parquet / .txt (also compressed: .gz .bz2 .xz)."""
    format: Literal["text", "alpaca", "sharegpt"] = "text"
    """`text`: one text column, causal-LM loss on all of it. `alpaca`: instruction / input / output (/ history /
    system). `sharegpt`: a list of messages (sharegpt, OpenAI `messages`, Firefly `conversation`)."""
    columns: ColumnsConfig = field(default_factory=ColumnsConfig)
    tags: TagsConfig = field(default_factory=TagsConfig)
    mask_history: bool = False
    """Dialogues: train only the last answer of each. Default: every answer, each its own sample after `<sop>` with
    the `[Round i]` prompt of the turns before it."""
    train_on_prompt: bool = False
    """Dialogues: also train the prompt (laid out after `<sop>` with the answer, where attention is causal)."""
    sources: list[SourceConfig] = field(default_factory=list)
    """Several datasets mixed in one run (each: files, format, columns, tags, weight, max_samples); `data.files` is
    the shorthand for one."""
    max_samples: int | None = None
    """Only the first N rows of `data.files`."""
    txt_unit: Literal["line", "paragraph", "document"] = "line"
    """A sample of a .txt file: each line, each paragraph (blank-line separated), or the whole document."""
    text_column: str | None = None
    """Guessed when obvious (`content`, `text`, `sentence`)."""
    label_column: str | None = None
    """`task: seq_cls`: the label of each text (default `label` or `labels`). Strings or integers: one class a row;
    decimals: regression; lists of strings (JSON): multi-label. The label names are saved in the model's config."""
    tokens_column: str | None = None
    """`task: token_cls`: a list of tokens a row (default `tokens`): characters for Chinese, words for English."""
    tags_column: str | None = None
    """`task: token_cls`: one BIO tag a token (B-PER, I-PER, O; default `tags` or `ner_tags`)."""
    eval_files: list[str] = field(default_factory=list)
    """Read with the `data.` settings (format, columns, tags), or with the first source's under `data.sources`."""
    validation_split: float = 0.0
    """Fraction of the training rows held out for evaluation when `eval_files` is empty."""
    streaming: bool = False
    """Read the files lazily instead of through the Arrow cache (needs `max_steps`)."""
    num_proc: int | None = None
    """Processes for tokenization (None: one)."""
    cache_dir: str | None = None
    """Where `datasets` keeps its Arrow cache (None: its default, ~/.cache/huggingface/datasets)."""
    encoding: str | None = None
    """Text encoding of the files; None detects UTF-8 (with or without BOM) or GBK/GB18030 for each file."""
    on_bad_row: Literal["skip", "error"] = "skip"
    """A CSV row with more cells than its header, or a cell holding a list / object instead of text: `skip` it
    (counted, and named in a warning) or stop with an `error` that names the file and row."""
    field: str | None = None  # last: the name hides dataclasses.field below it
    """JSON files holding their records under a key (`{"data": [...]}`): that key."""


@dataclass
class LoraSettings:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))
    fused_dropout: bool = False
    """On a CUDA GPU, draw the dropout inside each adapter's first product instead of writing a dropped copy of its
    input and keeping it for the backward (training/lora_dropout.py): less memory at large batches, at the same speed
    there (benchmarks/README.md, issue #23); false keeps peft's dropout module."""


@dataclass
class PtuningSettings:
    """`method: ptuning`: P-Tuning v2 as the official ptuning/main.py (its defaults)."""

    pre_seq_len: int = 128
    """Prefix slots: trained keys and values every layer attends to before the text."""
    prefix_projection: bool = False
    """Encode the prefix through a 2-layer MLP (hidden -> hidden -> 2 x layers x hidden) instead of one embedding."""
    dropout: float = 0.1
    """Dropout on the prefix's keys and values while training (the official model's fixed 0.1)."""


@dataclass
class FreezeSettings:
    trainable_layers: int = 2
    """`method: freeze` trains only the last N transformer layers."""


@dataclass
class QuantizationSettings:
    """QLoRA: `method: lora` on a base loaded in 4 or 8 bits by bitsandbytes (`pip install "thuglm[quant]"`)."""

    bits: Literal[4, 8] | None = None
    """4 or 8: quantize the base's linear layers on loading; unset: no quantization."""
    type: Literal["nf4", "fp4"] = "nf4"
    """The 4-bit data type (QLoRA's NormalFloat4, or plain FP4)."""
    double_quant: bool = True
    """4 bits: quantize the per-block scales too (~0.4 bit a weight less)."""
    compute_dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """The dtype the dequantized weights multiply in; `auto`: the run's precision."""


@dataclass
class DpoSettings:
    """`task: dpo`: preference tuning on pairs of a chosen and a rejected answer (TRL's losses; README, "Preference
    tuning")."""

    beta: float = 0.1
    """sigmoid / ipo: how far from the reference model the policy may move (lower: further); orpo: the weight of the
    odds-ratio term beside the chosen answer's NLL; simpo: the reward scale."""
    loss_type: Literal["sigmoid", "ipo", "orpo", "simpo"] = "sigmoid"
    """`sigmoid`: DPO; `ipo`: IPO (per-token log-ratios, as TRL); `orpo` and `simpo`: no reference model."""
    simpo_gamma: float = 0.5
    """simpo: the target reward margin (TRL's CPOConfig.simpo_gamma)."""


@dataclass
class TrainConfig:
    model: str = ""
    """A model folder (official ChatGLM-6B layout or saved by thuglm), or `tiny`."""
    data: DataConfig = field(default_factory=DataConfig)
    task: Literal["causal_lm", "seq_cls", "token_cls", "dpo"] = "causal_lm"
    """`causal_lm`: language modelling (data.format text or alpaca). `seq_cls`: a label per text
    (data.text_column, data.label_column). `token_cls`: a BIO tag per token (data.tokens_column, data.tags_column).
    `dpo`: preference tuning on pairs of answers (alpaca or sharegpt with `chosen` / `rejected`; the `dpo` section)."""
    method: Literal["lora", "full", "freeze", "ptuning"] = "lora"
    """`ptuning`: P-Tuning v2 (the `ptuning` section); the output is in the official checkpoint layout."""
    output_dir: str = "outputs/run"
    max_seq_len: int = DEFAULT_MAX_SEQ_LEN
    """Tokens a row (a sample, or several packed); at most the model's `max_sequence_length` (2048 for ChatGLM-6B),
    unless `rope_scaling` stretches it."""
    rope_scaling: Literal["linear"] | None = None
    """`linear`: train on rows longer than the model's `max_sequence_length` by position interpolation (every rotary
    position divided by max_seq_len / max_sequence_length, so the longer rows see the positions the model knows).
    The trained folder records it; chat, generate, serve and merge load the base that way."""
    packing: bool | None = None
    """Several samples a row, each with its own positions and mask. Default: on for text, off for alpaca."""
    max_steps: int = -1
    """Optimizer steps; -1 trains for `epochs`."""
    epochs: float = 1.0
    batch_size: int | Literal["auto"] = 4
    """Rows a micro-batch in each process (GPU). `auto`: the largest that fits the GPU, found by trying before
    training, with gradient accumulation keeping `global_batch_size` (required with it); the whole per-process batch
    on a CPU. A resumed run keeps the size its checkpoint was trained with."""
    eval_batch_size: int | None = None
    gradient_accumulation_steps: int = 1
    global_batch_size: int | None = None
    """Rows per optimizer step over all processes. `batch_size` is per process (GPU), so a step takes
    batch_size x processes x gradient_accumulation_steps rows; with this key set, gradient_accumulation_steps is
    derived from it instead (leave that one out), and the run takes the same steps on 1 GPU or several."""
    learning_rate: float | None = None
    """Default: 2e-4 for lora, 2e-2 for ptuning (the official recipe's), 2e-5 for full and freeze."""
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    optimizer: Literal["adamw", "adafactor"] = "adamw"
    """`adamw`: the Trainer's AdamW (two moments a weight). `adafactor`: thuglm's Adafactor (training/optim.py): no
    first moment and a factored second moment (4 MB for ChatGLM-6B against AdamW's 46 GB), bf16 weights updated with
    stochastic rounding; it takes learning_rate (warmup and decay by lr_scheduler) and weight_decay as AdamW does."""
    optimizer_in_backward: bool = False
    """With `optimizer: adafactor`: update each weight inside the backward pass as soon as its gradient is complete,
    and free that gradient, so the model's gradients never all exist at once (with bf16 and gradient_checkpointing,
    full fine-tuning of ChatGLM-6B fits a 24 GB card). The price: one process, one GPU; no gradient accumulation
    (raise batch_size instead); no clipping over all weights (max_grad_norm is off: Adafactor caps the RMS of each
    weight's update instead); a NaN / inf loss stops the run after that step's update was applied (the weights in
    memory are then not saved), so `on_nan: skip` is refused; no fp16 (its loss scaling checks the gradients after
    the backward pass, too late)."""
    max_grad_norm: float | None = None
    """Clip the norm of all gradients together to this; 0: no clipping. Default: 1.0, and 0 with
    optimizer_in_backward (no moment of the step holds all the gradients)."""
    seed: int = 42
    logging_steps: int = 10
    save_steps: int = 500
    """Write a checkpoint (weights, optimizer, data position: what resuming needs) every this many steps and at the
    end. 0: none, only the trained model at the end; a stopped run then cannot resume, and full fine-tuning of 6B
    saves the ~75 GB of AdamW state it would otherwise write at the end."""
    save_total_limit: int | None = None
    eval_steps: int | None = None
    """Default: every `save_steps` (with save_steps 0: only at the end)."""
    resume_from_checkpoint: bool | str = False
    """`true`: the newest checkpoint in output_dir; or a checkpoint folder."""
    overwrite_output_dir: bool = False
    """Start afresh in an output_dir that holds an earlier run: its checkpoints are deleted when training starts."""
    on_nan: Literal["stop", "skip"] = "stop"
    """A NaN or infinite loss or gradient: `stop` the run (the last checkpoint stays the last good one), or `skip`
    that optimizer step and go on (skipped steps are counted in the log and metrics.json)."""
    precision: Literal["auto", "bf16", "fp16", "fp32", "fp8"] = "auto"
    """`auto`: bf16 on a GPU that has it, fp16 on an older GPU, fp32 on CPU. `fp8` (LoRA, with `compile: true`, on a
    GPU of compute capability 8.9+): a bf16 run whose frozen base weights multiply in FP8 (training/fp8.py)."""
    gradient_checkpointing: bool = False
    attn_implementation: Literal["auto", "sdpa", "eager", "flex_attention"] = "auto"
    """`auto`: `flex_attention` (GLM's mask as a BlockMask: masked blocks are skipped, not computed) where packed rows
    go through layers compiled without gradient_checkpointing on a GPU of compute capability 8.0+, where it measured
    faster than SDPA; `sdpa` elsewhere, unpacked rows included (benchmarks/README.md, issue #23). torch has no
    flex_attention backward on a CPU."""
    compile: bool = False
    """torch.compile each transformer layer (one graph all layers share; with gradient_checkpointing, each layer's
    attention and MLP, so the checkpoint stays outside the compiled code): fewer, fused kernels and far less host
    work a step (the 6B shape's LoRA step with and without it: benchmarks/README.md, "Training"). The first steps
    compile, which takes longest on a CPU. One GPU or DDP."""
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    lora: LoraSettings = field(default_factory=LoraSettings)
    ptuning: PtuningSettings = field(default_factory=PtuningSettings)
    freeze: FreezeSettings = field(default_factory=FreezeSettings)
    quantization: QuantizationSettings = field(default_factory=QuantizationSettings)
    dpo: DpoSettings = field(default_factory=DpoSettings)

    def gradient_accumulation_for(self, processes: int) -> int:
        """Micro-batches per optimizer step in each of `processes` processes: `gradient_accumulation_steps`, or what
        `global_batch_size` makes of it for this number of processes. Only the launch knows that number, so this
        is the one setting not filled in by `load_config`; a global batch the processes cannot share is refused."""
        if self.global_batch_size is None:
            return self.gradient_accumulation_steps
        per_pass = self.batch_size * processes
        if self.global_batch_size % per_pass:
            raise ConfigError(
                f"config key `global_batch_size`: {self.global_batch_size} rows a step do not split over {processes} "
                f"process(es) x batch_size {self.batch_size}; make it a multiple of {per_pass}, or change "
                "batch_size or the number of processes"
            )
        return self.global_batch_size // per_pass

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Read a YAML config, apply `key=value` overrides (dotted keys, YAML values) and check every key."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"{path} is not valid YAML: {error}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path} must hold a mapping of keys (model: ..., data: ...), not {type(raw).__name__}")
    for override in overrides:
        key, value = parse_override(override)
        set_dotted(raw, key, value)
    config = build_dataclass(TrainConfig, raw, prefix="")
    check_config(config)
    resolve_defaults(config)
    return config


def default_learning_rate(method: str) -> float:
    """2e-4 for lora, 2e-2 for ptuning (the official recipe's), 2e-5 for full and freeze."""
    return {"lora": 2e-4, "ptuning": 2e-2}.get(method, 2e-5)


def default_max_grad_norm(config: TrainConfig) -> float:
    """1.0; 0 (no clipping) with optimizer_in_backward, where no moment of a step holds all the gradients."""
    return 0.0 if config.optimizer_in_backward else 1.0


def default_packing(config: TrainConfig) -> bool:
    """On for causal-LM text (every source's format text), off for dialogues and classification."""
    formats = [source.format or config.data.format for source in config.data.sources] or [config.data.format]
    return config.task == "causal_lm" and all(fmt == "text" for fmt in formats)


def resolve_defaults(config: TrainConfig) -> None:
    """Fill the keys whose default depends on other keys (learning_rate, max_grad_norm, packing), once, after the
    config was checked: everything after `load_config` reads plain fields, and thuglm_train.yaml records them."""
    if config.learning_rate is None:
        config.learning_rate = default_learning_rate(config.method)
    if config.max_grad_norm is None:
        config.max_grad_norm = default_max_grad_norm(config)
    if config.packing is None:
        config.packing = default_packing(config)


def check_max_seq_len(config: TrainConfig, model_config: Any) -> None:
    """`max_seq_len` against the model's `max_sequence_length` (its config.json: 2048 for ChatGLM-6B): the model
    was trained on no longer rows, so a longer one is refused before any data is read, unless `rope_scaling`
    stretches the positions to it; a `rope_scaling` with nothing to stretch is refused too."""
    limit = getattr(model_config, "max_sequence_length", None)
    if limit is None:
        return
    if config.max_seq_len > limit and config.rope_scaling is None:
        raise ConfigError(
            f"config key `max_seq_len` is {config.max_seq_len}, and the model ({config.model}) was trained on at most "
            f"{limit} tokens (max_sequence_length in its config.json): set max_seq_len to {limit} or less (longer "
            "texts are split into windows of max_seq_len (text) or lose their oldest rounds first (dialogues)), or "
            "add `rope_scaling: linear` to train on the longer rows with the positions interpolated"
        )
    if config.rope_scaling is not None and config.max_seq_len <= limit:
        raise ConfigError(
            f"config key `rope_scaling: {config.rope_scaling}` stretches the positions past the {limit} tokens the "
            f"model ({config.model}) was trained on, and max_seq_len {config.max_seq_len} is within them: remove "
            f"rope_scaling, or raise max_seq_len above {limit}"
        )


def long_context_kwargs(config: TrainConfig, model_config: Any) -> dict[str, Any]:
    """The base config's keys a `rope_scaling` run changes (`from_pretrained` arguments; none without it): the
    context becomes max_seq_len, and the rotary's factor grows by max_seq_len / the old context (on a base that is
    already stretched, its factor times that)."""
    if config.rope_scaling is None:
        return {}
    limit = model_config.max_sequence_length
    factor = getattr(model_config, "rope_factor", 1.0) * config.max_seq_len / limit
    return {"max_sequence_length": config.max_seq_len,
            "rope_parameters": {"rope_type": config.rope_scaling, "factor": factor}}


def parse_override(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override `{text}` must look like key=value, e.g. data.text_column=sentence")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value  # a plain string that YAML cannot read, such as `a: b`
    return key.strip(), parsed


def set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = raw
    for name in parents:
        child = node.setdefault(name, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override `{key}`: `{name}` is a value, not a section")
        node = child
    node[leaf] = value


def valid_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key of a config dataclass (sections and their fields)."""
    keys = []
    for name, hint in typing.get_type_hints(cls).items():
        keys.append(prefix + name)
        if dataclasses.is_dataclass(hint):
            keys.extend(valid_keys(hint, f"{prefix}{name}."))
        elif typing.get_origin(hint) is list and dataclasses.is_dataclass(typing.get_args(hint)[0]):
            keys.extend(valid_keys(typing.get_args(hint)[0], f"{prefix}{name}."))
        elif any(dataclasses.is_dataclass(arg) for arg in typing.get_args(hint)):
            inner = next(arg for arg in typing.get_args(hint) if dataclasses.is_dataclass(arg))
            keys.extend(valid_keys(inner, f"{prefix}{name}."))
    return keys


def _unknown_key_error(key: str) -> ConfigError:
    close = difflib.get_close_matches(key, valid_keys(TrainConfig), n=1, cutoff=0.6)
    hint = f" Did you mean `{close[0]}`?" if close else " See configs/ for the keys that exist."
    return ConfigError(f"unknown config key `{key}`.{hint}")


def build_dataclass(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"config key `{prefix.rstrip('.')}` is a section: give it keys, not {raw!r}")
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in raw.items():
        if key not in hints:
            raise _unknown_key_error(prefix + str(key))
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            values[key] = build_dataclass(hint, value if value is not None else {}, f"{prefix}{key}.")
        else:
            values[key] = coerce(value, hint, prefix + key)
    return cls(**values)


def coerce(value: Any, hint: Any, key: str) -> Any:
    """Check `value` against the field's type; accept the obvious conversions (int for float, one item for a list)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return coerce(value, option, key)
            except ConfigError as error:
                errors.append(str(error))
        if len(errors) == 1:
            raise ConfigError(errors[0])
        # "must be an integer; got 'four'" and "must be one of auto; got 'four'" -> "must be an integer or auto; ..."
        wanted = [error.partition(" must be ")[2].rpartition("; got")[0].removeprefix("one of ") for error in errors]
        raise ConfigError(f"config key `{key}` must be {' or '.join(wanted)}; got {value!r}")
    if origin is Literal:
        if value in args:
            return value
        close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
        hint_text = f" (did you mean `{close[0]}`?)" if close else ""
        raise ConfigError(f"config key `{key}` must be one of {', '.join(map(str, args))}; got {value!r}{hint_text}")
    if origin is list:
        items = value if isinstance(value, list) else [value]
        return [coerce(item, args[0], key) for item in items]
    if dataclasses.is_dataclass(hint):
        return build_dataclass(hint, value if value is not None else {}, f"{key}.")
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key `{key}` must be true or false; got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"config key `{key}` must be an integer; got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `2e-4` as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key `{key}` must be a number; got {value!r}")
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"config key `{key}` must be a string; got {value!r}")
    raise TypeError(f"config field `{key}` has a type the loader does not handle: {hint}")


def check_config(config: TrainConfig) -> None:
    """Rules that span several keys."""
    from .tasks import get_task  # the tasks read TrainConfig: imported here, once the config module is whole

    if not config.model:
        raise ConfigError("config key `model` is required: a model folder (official layout or saved by thuglm), or `tiny`")
    if not config.data.files and not config.data.sources:
        raise ConfigError("config key `data.files` is required: files, folders or globs of your training data "
                          "(or `data.sources`, a list of datasets to mix)")
    check_data_sources(config)
    if config.max_seq_len < 8:
        raise ConfigError(f"config key `max_seq_len` must be at least 8; got {config.max_seq_len}")
    if not 0.0 <= config.data.validation_split < 1.0:
        raise ConfigError(f"config key `data.validation_split` must be in [0, 1); got {config.data.validation_split}")
    if config.data.streaming and config.max_steps <= 0:
        raise ConfigError("`data.streaming: true` needs `max_steps`: a stream has no known length to count epochs in")
    if config.data.streaming and config.data.validation_split and not config.data.eval_files:
        raise ConfigError("`data.validation_split` cannot split a stream; give `data.eval_files` instead")
    for key in ("batch_size", "gradient_accumulation_steps", "logging_steps"):
        if getattr(config, key) != "auto" and getattr(config, key) < 1:
            raise ConfigError(f"config key `{key}` must be at least 1; got {getattr(config, key)}")
    if config.save_steps < 0:
        raise ConfigError(f"config key `save_steps` must be at least 0 (0: no checkpoints); got {config.save_steps}")
    if config.eval_steps is not None and config.eval_steps < 1:
        raise ConfigError(f"config key `eval_steps` must be at least 1; got {config.eval_steps}")
    if config.batch_size == "auto":
        check_automatic_batch_size(config)
    elif config.global_batch_size is not None and config.global_batch_size < config.batch_size:
        raise ConfigError(f"config key `global_batch_size` must be at least batch_size ({config.batch_size}); "
                          f"got {config.global_batch_size}")
    if config.global_batch_size is not None and config.gradient_accumulation_steps != 1:
        raise ConfigError("set `global_batch_size` or `gradient_accumulation_steps`, not both: the first derives the "
                          "second from batch_size and the number of processes")
    task = get_task(config.task)
    if config.method == "ptuning" and not task.trains_with_prefix:
        raise ConfigError(f"`method: ptuning` trains a language model's prefix; `task: {config.task}` needs a new head "
                          "trained too: use `method: lora` (it trains the head with the adapter) or full/freeze")
    if config.method == "lora" and not config.lora.target_modules:
        raise ConfigError("config key `lora.target_modules` is empty: name the linear layers LoRA adapts")
    if not 0 <= config.lora.dropout < 1:
        raise ConfigError(f"config key `lora.dropout` must be at least 0 and below 1; got {config.lora.dropout}")
    if config.quantization.bits is not None and config.method not in ("lora", "ptuning"):
        raise ConfigError(f"`quantization.bits: {config.quantization.bits}` freezes the base in {config.quantization.bits}"
                          f" bits, which `method: {config.method}` would have to train: use `method: lora` (QLoRA) or "
                          "`method: ptuning`, or remove the quantization section to fine-tune the base itself")
    if config.precision == "fp8" and (config.method != "lora" or config.quantization.bits is not None
                                      or not config.compile):
        raise ConfigError("`precision: fp8` multiplies a bf16 base's frozen weights in FP8 under LoRA adapters, fused "
                          "by torch.compile: it needs `method: lora`, no `quantization` section and `compile: true` "
                          f"(this config has method {config.method}, quantization.bits {config.quantization.bits}, "
                          f"compile {str(config.compile).lower()})")
    task.check_config(config)
    if config.optimizer_in_backward:
        check_optimizer_in_backward(config)


def check_automatic_batch_size(config: TrainConfig) -> None:
    """`batch_size: auto` chooses the micro-batch and derives the accumulation from the global batch."""
    if config.global_batch_size is None:
        raise ConfigError("`batch_size: auto` keeps the rows of an optimizer step and finds how many of them fit a "
                          "micro-batch: give them as `global_batch_size` (e.g. global_batch_size: 16), or set a "
                          "number as batch_size")
    if config.optimizer_in_backward:
        raise ConfigError("`batch_size: auto` may split a step into micro-batches, which `optimizer_in_backward: true` "
                          "cannot accumulate: set batch_size to a number that fits, or optimizer_in_backward: false")


def check_optimizer_in_backward(config: TrainConfig) -> None:
    """Each weight is updated in the backward pass and its gradient freed: no moment of a step sees all gradients."""
    off = "or set optimizer_in_backward: false"
    if config.optimizer != "adafactor":
        raise ConfigError(f"`optimizer_in_backward: true` steps thuglm's Adafactor inside the backward pass, not "
                          f"`optimizer: {config.optimizer}`: add `optimizer: adafactor`, {off}")
    accumulated = config.gradient_accumulation_steps > 1 or config.global_batch_size not in (None, config.batch_size)
    if accumulated:
        given = (f"global_batch_size {config.global_batch_size} with batch_size {config.batch_size}"
                 if config.global_batch_size else f"gradient_accumulation_steps {config.gradient_accumulation_steps}")
        raise ConfigError(f"`optimizer_in_backward: true` updates the weights in every backward pass, so it cannot "
                          f"accumulate gradients over micro-batches ({given}): raise batch_size instead (with "
                          f"gradient_checkpointing to fit it) and leave out gradient_accumulation_steps / "
                          f"global_batch_size, {off}")
    if config.max_grad_norm is not None and config.max_grad_norm > 0:
        raise ConfigError(f"`max_grad_norm: {config.max_grad_norm}` clips the norm of all gradients together, and "
                          "`optimizer_in_backward: true` never holds them all (Adafactor caps the RMS of each weight's "
                          f"update instead): remove max_grad_norm (or set it to 0), {off}")
    if config.on_nan == "skip":
        raise ConfigError("`on_nan: skip` cannot skip a step whose update `optimizer_in_backward: true` has already "
                          "applied in the backward pass: use on_nan: stop (the run stops at the bad step, and you "
                          f"resume from the last checkpoint), {off}")
    if config.precision == "fp16":
        raise ConfigError(_FP16_IN_BACKWARD.format(precision="`precision: fp16`"))


_FP16_IN_BACKWARD = ("{precision} scales the loss and checks the gradients for overflow after the backward pass, too "
                     "late for `optimizer_in_backward: true`, which has applied them by then: use precision bf16 (or "
                     "fp32), or set optimizer_in_backward: false")


def check_optimizer_placement(config: TrainConfig, processes: int, precision: str, sharding: str | None) -> None:
    """What only the launch decides: the number of processes (or GPUs of one), the precision `auto` chose, and
    whether accelerate shards the model (`sharding`: "FSDP", "DeepSpeed" or None)."""
    if config.optimizer == "adafactor" and sharding:
        raise ConfigError(f"`optimizer: adafactor` updates whole weight matrices, and under {sharding} each process "
                          f"holds shards of them: use optimizer: adamw with {sharding}, or Adafactor on one GPU or "
                          "with DDP (`thuglm train --nproc N`)")
    if not config.optimizer_in_backward:
        return
    if processes > 1:
        raise ConfigError(f"`optimizer_in_backward: true` trains in one process on one GPU, and this run has "
                          f"{processes} (processes, or GPUs one process sees): DDP averages the gradients in backward "
                          "hooks of its own, which the updates would run ahead of. Make one GPU visible "
                          "(CUDA_VISIBLE_DEVICES=0) without --nproc / torchrun, or set optimizer_in_backward: false")
    if precision == "fp16":
        raise ConfigError(_FP16_IN_BACKWARD.format(
            precision=f"precision fp16 (what `precision: {config.precision}` chose on this GPU, which has no bf16)"))


def check_data_sources(config: TrainConfig) -> None:
    """`data.files` or `data.sources`; columns and tags that the format reads; sensible weights and limits."""
    data = config.data
    if data.files and data.sources:
        raise ConfigError("give `data.files` (one dataset) or `data.sources` (several to mix), not both: move the "
                          "files into a source (`data.sources: [{files: [...]}, ...]`)")
    _check_columns(data.format, data.columns, data.tags, "data")
    if config.task != "dpo" and (ranking := [role for role in RANKING_ROLES if getattr(data.columns, role)]):
        raise ConfigError(f"config key `data.columns.{ranking[0]}` names an answer of a ranking dataset, which "
                          f"`task: dpo` trains on; this run is `task: {config.task}`: set task: dpo, or remove it")
    if data.max_samples is not None and data.max_samples < 1:
        raise ConfigError(f"config key `data.max_samples` must be at least 1; got {data.max_samples}")
    for index, source in enumerate(data.sources):
        where = f"data.sources[{index}]"
        if not source.files:
            raise ConfigError(f"`{where}` needs `files`: the files, folders or globs of this dataset")
        fmt = source.format or data.format
        _check_columns(fmt, source.columns or ColumnsConfig(), source.tags or TagsConfig(), where)
        if source.weight is not None and source.weight <= 0:
            raise ConfigError(f"config key `{where}.weight` must be above 0; got {source.weight}")
        if source.max_samples is not None and source.max_samples < 1:
            raise ConfigError(f"config key `{where}.max_samples` must be at least 1; got {source.max_samples}")


def _check_columns(fmt: str, columns: ColumnsConfig, tags: TagsConfig, where: str) -> None:
    for role in columns.given():
        if role not in FORMAT_COLUMNS[fmt]:
            readers = [name for name, roles in FORMAT_COLUMNS.items() if role in roles]
            raise ConfigError(f"config key `{where}.columns.{role}` is not read by format {fmt} (it reads "
                              f"{', '.join(FORMAT_COLUMNS[fmt])}); `{role}` is for {' / '.join(readers)}")
    if tags.given() and fmt != "sharegpt":
        raise ConfigError(f"config key `{where}.tags` names keys inside sharegpt messages, and this format is {fmt}")


def source_specs(data: DataConfig):
    """The run's datasets as `thuglm.data.formats.SourceSpec`s: `data.files`, or every `data.sources` item."""
    from ..data.formats import SourceSpec

    if not data.sources:
        return [data_spec(data, data.files)]
    specs = []
    for source in data.sources:
        fmt = source.format or data.format
        same = fmt == data.format
        columns = {**(data.columns.given() if same else {}), **(source.columns.given() if source.columns else {})}
        tags = {**(data.tags.given() if same else {}), **(source.tags.given() if source.tags else {})}
        specs.append(SourceSpec(
            files=tuple(source.files), format=fmt, columns=columns, tags=tags,
            text_column=source.text_column or (data.text_column if same else None),
            field=source.field or data.field, txt_unit=source.txt_unit or data.txt_unit,
            encoding=source.encoding or data.encoding, weight=source.weight, max_samples=source.max_samples,
        ))
    return specs


def data_spec(data: DataConfig, files):
    """`files` read with the `data.` settings (format, columns, tags, ...): data.files, eval_files, a prompt file."""
    from ..data.formats import SourceSpec

    return SourceSpec(
        files=tuple(str(file) for file in files), format=data.format, columns=data.columns.given(),
        tags=data.tags.given(), text_column=data.text_column, field=data.field, txt_unit=data.txt_unit,
        encoding=data.encoding, max_samples=data.max_samples,
    )


RUN_CONFIG_NAME = "thuglm_train.yaml"


def run_data_spec(run_dir: str | Path, files, overrides: list[str] | tuple[str, ...] = ()):
    """How `thuglm generate` / `thuglm eval` read `files`: as the run in `run_dir` read its data (the `data` section
    of its thuglm_train.yaml), with `data.KEY=value` overrides; None for a folder without that file and no override.

    A run that mixed `data.sources` reads a file with the settings of the source whose files include it, else with
    the first source's.
    """
    from ..data import resolve_data_files

    path = Path(run_dir) / RUN_CONFIG_NAME
    if not path.is_file() and not overrides:
        return None
    raw: dict[str, Any] = {}
    if path.is_file():
        saved = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        raw = dict(saved.get("data") or {}) if isinstance(saved, dict) else {}
    if any(parse_override(override)[0] == "data.format" for override in overrides):
        for key in ("columns", "tags", "text_column"):  # the run's mapping belongs to the run's format
            raw.pop(key, None)
    for override in overrides:
        key, value = parse_override(override)
        if not key.startswith("data."):
            raise ConfigError(f"override `{override}`: only data keys apply here (as in `thuglm train`), e.g. "
                              "data.format=sharegpt or data.columns.prompt=content")
        set_dotted(raw, key[len("data."):], value)
    raw["files"] = [str(file) for file in ([files] if isinstance(files, (str, Path)) else files)]
    sources = raw.pop("sources", None) or []
    data = build_dataclass(DataConfig, raw, prefix="data.")
    _check_columns(data.format, data.columns, data.tags, "data")
    wanted = {Path(file).absolute() for file in data.files if Path(file).is_file()}
    if sources and wanted and not any(key.startswith(("data.format", "data.columns", "data.tags"))
                                      for key in (parse_override(o)[0] for o in overrides)):
        mixed = build_dataclass(DataConfig, {**raw, "files": [], "sources": sources}, prefix="data.")
        for spec in source_specs(mixed):
            try:
                trained = set(resolve_data_files(list(spec.files)))
            except ThuglmError:  # the run's files moved or were relative to another folder
                continue
            if wanted <= trained:
                return spec.reading(data.files)
        return source_specs(mixed)[0].reading(data.files)  # a file of no source: the first source's settings
    return data_spec(data, data.files).reading(data.files)
