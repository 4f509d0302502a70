"""Load a ChatGLM for inference: a model folder, a base plus a peft adapter, or a LoRA training's output folder.

A LoRA run's `output_dir` holds `adapter_config.json`, the adapter weights and the tokenizer files, but not the base
model; peft records the base folder in `adapter_config.json` (`base_model_name_or_path`), so that folder alone is
enough to load the trained model. Every way this can go wrong raises `ModelLoadError`, naming the folder, what is
missing there and what to do about it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from ..data.samples import DEFAULT_MAX_SEQ_LEN
from ..errors import ThuglmError
from ..models.folders import (
    ModelLoadError,
    check_model_folder,
    check_tokenizer_fits,
    recorded_base_changes,
    tokenizer_folder,
)
from ..models.precision import DTYPES, auto_precision

# Importing anything under thuglm runs thuglm/__init__.py first, which registers ChatGLM with the Auto classes.
from ..models.prefix import (
    attach_prefix_encoder,
    is_ptuning_folder,
    load_prefix_state_dict,
    ptuning_settings,
    recorded_base,
)
from ..models.quantization import check_official_checkpoint
from .quantized import check_official_quantized, quantize_kwargs

ADAPTER_CONFIG_NAME = "adapter_config.json"


logger = logging.getLogger("thuglm.inference")


class ContextLengthError(ThuglmError, ValueError):
    """A length asked of a model beyond the longest rows it was trained on (its `max_sequence_length`)."""


def context_length(model) -> int | None:
    """The model's `max_sequence_length` (its config.json; 2048 for ChatGLM-6B): the longest rows it was trained on."""
    return getattr(model.config, "max_sequence_length", None)


def row_length(max_seq_len: int | None, model, flag: str = "--max-seq-len") -> int:
    """Tokens a row for `thuglm eval` / `thuglm predict`: left out, DEFAULT_MAX_SEQ_LEN (cut to the model's context);
    longer than the context, refused with both numbers and the fix, as `thuglm train` refuses its max_seq_len."""
    limit = context_length(model)
    if max_seq_len is None:
        return min(DEFAULT_MAX_SEQ_LEN, limit) if limit else DEFAULT_MAX_SEQ_LEN
    if limit is not None and max_seq_len > limit:
        raise ContextLengthError(f"{flag} {max_seq_len} is longer than the {limit} tokens the model was trained on "
                                 f"(max_sequence_length in its config.json): pass {flag} {limit} or less")
    return max_seq_len


def warn_past_context(model, flag: str, tokens: int) -> None:
    """A flag that lets prompt and answer together reach `tokens`, past the model's context: allowed (the rotary
    positions go on), but the model was never trained there, so the user is told once, with the limit."""
    limit = context_length(model)
    if limit is not None and tokens > limit:
        logger.warning("%s: %d tokens of prompt and answer, past the %d the model was trained on "
                       "(max_sequence_length in its config.json); text beyond that may degrade, %d or less stays "
                       "within it", flag, tokens, limit, limit)


def resolve_dtype(dtype: str | torch.dtype = "auto") -> torch.dtype:
    """"auto" is bf16 on a CUDA card that supports it (ChatGLM-6B in fp16 can overflow), else fp32."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return DTYPES[auto_precision(without_bf16="fp32")]
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}: use one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def is_adapter_folder(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG_NAME).is_file()


# The heads `thuglm train` trains with `task: seq_cls` / `token_cls` (architectures in their config.json).
CLASSIFIER_TASKS = {"ChatGLMForSequenceClassification": "seq_cls", "ChatGLMForTokenClassification": "token_cls"}


def check_language_model(folder: Path) -> None:
    """chat, generate and merge need the language-model head: a classifier's folder is refused with what to use.

    Loaded as a language model, a classifier would lose its trained head without a word and answer with the
    base model's untrained-for-this head (or a fresh one).
    """
    from transformers import AutoConfig

    if not (folder / "config.json").is_file():
        return
    architecture = next(iter(AutoConfig.from_pretrained(folder).architectures or []), None)
    task = CLASSIFIER_TASKS.get(architecture)
    if task is not None:
        kind = "sequence" if task == "seq_cls" else "token"
        raise ModelLoadError(
            f"{folder} is a {kind} classifier ({architecture}, trained with `task: {task}`), not a language model: "
            f"chat, generate and merge need one. Predict with it: `thuglm predict {folder} FILE`."
        )


def check_adapter_folder(path: Path) -> None:
    if not path.is_dir():
        raise ModelLoadError(f"adapter folder {path} does not exist: pass the output_dir of a LoRA training run")
    if not is_adapter_folder(path) and not is_ptuning_folder(path):  # peft, or P-Tuning v2 (official layout)
        raise ModelLoadError(
            f"{path} is not a peft adapter folder (no {ADAPTER_CONFIG_NAME}). Pass the output_dir of a LoRA run of "
            "`thuglm train` (it holds adapter_config.json and adapter_model.safetensors); a full fine-tune's output "
            "is a whole model: use it as the model itself, with no adapter."
        )


BASE_IN_PYTHON = "load_for_inference(BASE_DIR, adapter=ADAPTER_DIR)"


def adapter_base_folder(adapter: Path, how_to_name_base: str | None = BASE_IN_PYTHON) -> Path:
    """The base model folder a peft adapter was trained on, as recorded in its adapter_config.json.

    `how_to_name_base` is how the caller's user passes the base folder instead (each command has its own flag);
    None where there is no way, and the message then only says how to correct the adapter's config.
    """
    from peft import PeftConfig

    base = PeftConfig.from_pretrained(str(adapter)).base_model_name_or_path
    config_file = adapter / ADAPTER_CONFIG_NAME
    fixes = f"write the base model folder into base_model_name_or_path in {config_file}"
    if how_to_name_base is not None:
        fixes = f"pass the base model folder explicitly (`{how_to_name_base}`), or {fixes}"
    if not base:
        raise ModelLoadError(f"{config_file} does not name its base model (base_model_name_or_path is empty): {fixes}.")
    if not Path(base).is_dir():
        raise ModelLoadError(
            f"the adapter in {adapter} was trained on {base}, which is not a folder here (moved, deleted, or a "
            f"hub name; nothing is downloaded): {fixes}."
        )
    return Path(base)


def ptuning_base_folder(folder: Path, how_to_name_base: str | None = BASE_IN_PYTHON) -> Path:
    """The base a P-Tuning checkpoint goes on: the one thuglm recorded when it trained it (the official code
    records none: the base is then named by the caller)."""
    base = recorded_base(folder)
    how = f" (`{how_to_name_base}`)" if how_to_name_base is not None else ""
    if not base:
        raise ModelLoadError(f"{folder} is a P-Tuning checkpoint: the prefix alone, with no record of its base model. "
                             f"Pass the base model folder as the model and this folder as the adapter{how}.")
    if not Path(base).is_dir():
        raise ModelLoadError(f"the P-Tuning checkpoint {folder} was trained on {base}, which is not a folder here: "
                             f"pass the base model folder as the model and this folder as the adapter{how}.")
    return Path(base)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_for_inference(
    model_path: str | Path,
    adapter: str | Path | None = None,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device | None = None,
    how_to_name_base: str | None = BASE_IN_PYTHON,
    quantize: int | None = None,
) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    """Tokenizer and model in eval mode, from a model folder, optionally with a peft adapter on top.

    `model_path` may also be a LoRA training's output folder (it holds adapter_config.json): the base then comes
    from the adapter's config. The result of an adapter is a `peft.PeftModel`; `model.chat` and `model.generate`
    reach the ChatGLM underneath. `how_to_name_base` is how the caller's user names the base folder, should the one
    recorded in the adapter be missing (see `adapter_base_folder`). `quantize` 4 or 8 loads the base's linears in
    that many bits through bitsandbytes (`--quantize`; see `quantized.py`).
    """
    model_path = Path(model_path)
    adapter = Path(adapter) if adapter is not None else None
    if is_ptuning_folder(model_path):  # a P-Tuning run's output: its prefix on the base it records
        if adapter is not None:
            raise ModelLoadError(f"{model_path} is a P-Tuning checkpoint (a prefix, not a model), and an adapter "
                                 f"({adapter}) was given too: pass the base model folder as the model and one adapter.")
        model_path, adapter = ptuning_base_folder(model_path, how_to_name_base), model_path
    if is_adapter_folder(model_path):
        if adapter is not None:
            raise ModelLoadError(
                f"{model_path} is itself an adapter folder, and an adapter ({adapter}) was given too: pass the base "
                f"model folder as the model and one adapter, or {model_path} alone."
            )
        model_path, adapter = adapter_base_folder(model_path, how_to_name_base), model_path
    elif adapter is not None:
        check_adapter_folder(adapter)
    check_model_folder(model_path)
    for folder in (model_path, adapter):
        if folder is not None:
            check_language_model(folder)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder(adapter, model_path))
    check_tokenizer_fits(tokenizer, model_path)
    device = device or default_device()
    dtype = resolve_dtype(dtype)
    # A P-Tuning folder: the base, then a prefix encoder of the folder's pre_seq_len / prefix_projection on it.
    prefix = ptuning_settings(adapter) if adapter is not None and is_ptuning_folder(adapter) else {}
    official_bits = check_official_quantized(model_path, quantize)
    # An adapter trained with `rope_scaling` runs on its base with the context it was trained at.
    base_changes = recorded_base_changes(adapter) if adapter is not None else {}
    model = AutoModelForCausalLM.from_pretrained(
        model_path, dtype=dtype, device_map=str(device), **quantize_kwargs(quantize, dtype), **base_changes
    )
    if official_bits:  # a missing or corrupt weight_scale is named now, not at the first answer
        check_official_checkpoint(model)
    if prefix:  # attached after loading (never quantized), fp32 as the official recipe runs it, then loaded
        attach_prefix_encoder(model, **prefix)
        load_prefix_state_dict(model, adapter)
    elif adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    return tokenizer, model.eval()
