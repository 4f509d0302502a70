"""Checks of a model folder before transformers loads it: config, weights and tokenizer there, and fitting each other.

Used by every command that takes a model folder (`thuglm train`, chat, generate, eval, predict, merge, serve), so
each fails with the same message, naming the folder and what to do, instead of transformers' generic one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME

from ..errors import ThuglmError
from .configuration_chatglm import standard_rope_parameters
from .prefix import is_ptuning_folder
from .tokenization_chatglm import ChatGLMTokenizer

TOKENIZER_FILE = ChatGLMTokenizer.vocab_files_names["vocab_file"]  # ice_text.model
WEIGHT_FILES = (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME)
BASE_CHANGES_FILE = "thuglm_base_config.json"
"""In a trained folder: the keys of its base model's config.json that the run changed (`rope_scaling`'s longer
context), which an adapter folder has no config.json of its own to hold."""
CONTEXT_KEYS = ("max_sequence_length", "rope_parameters")


class ModelLoadError(ThuglmError, ValueError):
    """A model, adapter or tokenizer folder that cannot be loaded; the message says why and how to fix it."""


def check_model_folder(path: Path) -> None:
    """Fail with a useful message before transformers fails with a generic one."""
    if not path.is_dir():
        raise ModelLoadError(f"{path} is not a folder: pass the folder of a ChatGLM checkpoint (or `thuglm tiny {path}`)")
    if not (path / "config.json").is_file():
        raise ModelLoadError(
            f"{path} is not a model folder (no config.json). Pass the ChatGLM-6B checkpoint folder, a folder written "
            f"by `thuglm train` / `thuglm merge`, or build a tiny one with `thuglm tiny {path}`."
        )
    if is_ptuning_folder(path):  # loaded as a model, its base weights would all be missing: random answers
        raise ModelLoadError(
            f"{path} is a P-Tuning v2 checkpoint (a prefix only, no base weights), not a model folder: pass the base "
            f"model folder as the model and {path} as the adapter (`thuglm chat BASE_DIR --adapter {path}`)."
        )
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        raise ModelLoadError(
            f"{path} has a config.json but no weights (none of {', '.join(WEIGHT_FILES)}); the download or copy is "
            "incomplete: fetch the checkpoint's weight files into it."
        )


def check_tokenizer_fits(tokenizer: PreTrainedTokenizerBase, model_dir: Path) -> None:
    """The tokenizer must give ids the model has, and the special tokens GLM's positions and masks are built from.

    A tokenizer from another model (ChatGLM2's, or a vocabulary trained for another checkpoint) otherwise fails deep
    inside training, as `130004 is not in list` or an index error on the GPU.
    """
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    where = f"the tokenizer ({tokenizer.name_or_path}) and the model ({model_dir})"
    if len(tokenizer) > config.vocab_size:
        raise ModelLoadError(
            f"{where} do not fit: the tokenizer has {len(tokenizer):,} tokens, the model's embedding only "
            f"{config.vocab_size:,}. Use the ice_text.model that came with this checkpoint."
        )
    special = {"[gMASK]": ("gmask_token_id", tokenizer.gmask_token_id), "<sop>": ("bos_token_id", tokenizer.bos_token_id),
               "<eop>": ("eos_token_id", tokenizer.eos_token_id)}
    for token, (key, token_id) in special.items():
        expected = getattr(config, key, None)
        if expected is not None and token_id != expected:
            raise ModelLoadError(
                f"{where} do not fit: the tokenizer gives {token} id {token_id}, the model's config.json says "
                f"{key}={expected}. Use the ice_text.model and tokenizer_config.json that came with this checkpoint."
            )


def tokenizer_folder(*candidates: Path | None) -> Path:
    """The first folder holding the tokenizer: a training output's own copy wins over the base model's."""
    folders = [folder for folder in candidates if folder is not None]
    for folder in folders:
        if (folder / TOKENIZER_FILE).is_file():
            return folder
    raise ModelLoadError(
        f"no tokenizer: none of {', '.join(map(str, folders))} holds {TOKENIZER_FILE}. Copy ice_text.model and "
        "tokenizer_config.json from the ChatGLM-6B checkpoint into the model folder."
    )


def record_base_changes(folder: Path, config) -> None:
    """Write BASE_CHANGES_FILE into a saved `folder` when `config` (the trained model's) has a stretched context."""
    if getattr(config, "rope_parameters", None):
        changes = {key: getattr(config, key) for key in CONTEXT_KEYS}
        (Path(folder) / BASE_CHANGES_FILE).write_text(json.dumps(changes, indent=2) + "\n")


def recorded_base_changes(folder: Path) -> dict[str, Any]:
    """The base config keys to load an adapter's base with (`from_pretrained` arguments): none unless recorded."""
    path = Path(folder) / BASE_CHANGES_FILE
    if not path.is_file():
        return {}
    changes = json.loads(path.read_text())
    unknown = sorted(set(changes) - set(CONTEXT_KEYS))
    if unknown:
        raise ModelLoadError(f"{path} changes {', '.join(unknown)} of the base's config, which thuglm does not write "
                             f"there (only {', '.join(CONTEXT_KEYS)}): remove those keys")
    try:
        changes["rope_parameters"] = standard_rope_parameters(changes.get("rope_parameters"))
    except ValueError as error:
        raise ModelLoadError(f"{path}: {error}") from None
    return changes
