"""P-Tuning v2: trained keys and values that every layer attends to before the text (`config.pre_seq_len`).

This is ChatGLM-6B's official fine-tuning method (THUDM/ChatGLM-6B, `ptuning/`), with the official parameter names,
so a P-Tuning checkpoint (a `pytorch_model.bin` holding only `transformer.prefix_encoder.*`) loads as it is:

* the prefix encoder maps prefix slots 0..pre_seq_len-1 to one key and one value per layer and head: an embedding of
  `2 * num_layers * hidden_size` numbers per slot, or (`prefix_projection`) an embedding of `hidden_size` followed by
  Linear-Tanh-Linear up to that size;
* the prefix keys are not rotated (the official code puts them where a KV cache goes, after the rotary embedding
  was applied to the cached tokens), and every query of every sample sees every prefix slot;
* the text keeps its positions: position 0 is the first token, not the first prefix slot;
* 10% dropout on the keys and values while training, as the official model applies.

The prefix is not written into the KV cache: each layer puts it in front of its keys and values on every forward
(training, prefill, decoding with the dynamic or the static cache alike), and `widen_for_prefix` puts the matching
columns in front of the attention mask. The cache, the 2D attention mask, position ids and generate's bookkeeping
therefore stay those of the text alone, exactly as without a prefix. The price, when decoding: each step copies the
layer's keys and values (cache and prefix) into one tensor, as a dynamic cache does anyway; with a static cache that
is one extra pass over the cache per step, small next to reading the weights (~2-3% of a 6B decode step at 640
cached tokens, by bytes moved).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn


class ChatGLMPrefixEncoder(nn.Module):
    """The official `PrefixEncoder`: `embedding` (and `trans` with prefix_projection), same names and shapes."""

    def __init__(self, config):
        super().__init__()
        self.pre_seq_len = config.pre_seq_len
        self.num_layers = config.num_layers
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.prefix_projection = bool(config.prefix_projection)
        width = config.num_layers * config.hidden_size * 2
        if self.prefix_projection:
            self.embedding = nn.Embedding(config.pre_seq_len, config.hidden_size)
            self.trans = nn.Sequential(
                nn.Linear(config.hidden_size, config.hidden_size), nn.Tanh(), nn.Linear(config.hidden_size, width)
            )
        else:
            self.embedding = nn.Embedding(config.pre_seq_len, width)
        self.dropout = nn.Dropout(0.1)  # the official ChatGLMModel.dropout, applied to the prefix only
        for module in self.modules():  # see ChatGLMPreTrainedModel._init_weights
            if isinstance(module, (nn.Embedding, nn.Linear)):
                module.official_torch_init = True

    def forward(self, batch_size: int, dtype: torch.dtype) -> torch.Tensor:
        """Keys and values [num_layers, 2 (key, value), batch, heads, pre_seq_len, head_dim] in `dtype`.

        The prefix is the same for every row; it is computed once and expanded (a view) unless dropout is on, which
        draws a mask per row as the official code does.
        """
        if self.prefix_projection:
            slots = torch.arange(self.pre_seq_len, device=self.embedding.weight.device)
            encoded = self.trans(self.embedding(slots))
        else:
            encoded = self.embedding.weight
        encoded = encoded.to(dtype)
        # The official layout of the 2 * num_layers * hidden numbers of a slot: [layer][key | value][head][dim].
        encoded = encoded.view(1, self.pre_seq_len, 2 * self.num_layers, self.num_heads, self.head_dim)
        encoded = self.dropout(encoded.expand(batch_size, -1, -1, -1, -1))
        encoded = encoded.permute(2, 0, 3, 1, 4)  # [2 * layers, batch, heads, pre_seq_len, head_dim]
        return encoded.unflatten(0, (self.num_layers, 2))


def widen_for_prefix(mask, prefix_length: int):
    """An attention mask over the text's keys, widened to [prefix | text keys]: every query sees every prefix slot.

    `mask` is additive [batch, 1, q_len, k_len] (eager, sdpa, static cache), a FlexAttention BlockMask is built with
    `prefix_length` instead (`masking.glm_block_mask`), and None (everything visible) stays None.
    """
    if not isinstance(mask, torch.Tensor) or not prefix_length:  # None, or a BlockMask built with the prefix
        return mask
    return nn.functional.pad(mask, (prefix_length, 0), value=0.0)


def prefix_parameter_names(state_dict_keys) -> list[str]:
    """The keys of a state dict that belong to the prefix encoder (`transformer.prefix_encoder.*`)."""
    return [key for key in state_dict_keys if key.startswith("transformer.prefix_encoder.")]


# ---- the official checkpoint layout ------------------------------------------------------------------------------
# `ptuning/main.py` saves with `save_pretrained(output_dir, state_dict=<the trainable parameters>)`: config.json (the
# base's config with pre_seq_len and prefix_projection) and pytorch_model.bin holding `transformer.prefix_encoder.*`
# only, in fp32. Its README loads such a folder onto the base with the recipe `load_prefix_state_dict` follows.

PREFIX_KEY = "transformer.prefix_encoder."
PREFIX_WEIGHTS_NAME = "pytorch_model.bin"  # what the official loading recipe opens, by name
# The official code run under a transformers that saves safetensors by default (4.35 on) writes this instead.
PREFIX_SAFE_WEIGHTS_NAME = "model.safetensors"
BASE_MODEL_KEY = "base_model_name_or_path"  # thuglm's record of the base in config.json (the official code ignores it)


def _read_config(folder) -> dict:
    config_file = Path(folder) / "config.json"
    return json.loads(config_file.read_text()) if config_file.is_file() else {}


def _prefix_weights_file(folder) -> Path | None:
    for name in (PREFIX_WEIGHTS_NAME, PREFIX_SAFE_WEIGHTS_NAME):
        if (Path(folder) / name).is_file():
            return Path(folder) / name
    return None


def _read_state_dict(weights: Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    if weights.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(weights), device=device)
    return torch.load(weights, map_location=device, weights_only=True, mmap=device == "meta")


def is_ptuning_folder(folder) -> bool:
    """A P-Tuning v2 checkpoint: config.json with `pre_seq_len` and a pytorch_model.bin (or model.safetensors)
    holding prefix keys only. A whole model saved with a prefix is a model folder, not this."""
    weights = _prefix_weights_file(folder)
    if not _read_config(folder).get("pre_seq_len") or weights is None or weights.stat().st_size > 2**31:
        return False
    if weights.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(weights), framework="pt") as handle:
            keys = list(handle.keys())
    else:
        keys = list(_read_state_dict(weights, "meta"))
    return bool(keys) and all(key.startswith(PREFIX_KEY) for key in keys)


def ptuning_settings(folder) -> dict:
    """`pre_seq_len` and `prefix_projection` of a P-Tuning folder, to build the base's config with."""
    config = _read_config(folder)
    return {"pre_seq_len": config["pre_seq_len"], "prefix_projection": bool(config.get("prefix_projection", False))}


def recorded_base(folder) -> str | None:
    """The base model folder thuglm recorded when it trained this P-Tuning checkpoint, if any."""
    return _read_config(folder).get(BASE_MODEL_KEY)


def attach_prefix_encoder(model, pre_seq_len: int, prefix_projection: bool) -> ChatGLMPrefixEncoder:
    """Give a loaded ChatGLM a fresh prefix encoder (torch's initialisation, as the official one starts), in fp32 on
    the word embeddings' device, and record its shape in the config. Added after loading, so a 4-/8-bit base's
    quantization never touches it."""
    transformer = getattr(model, model.base_model_prefix, model)
    model.config.pre_seq_len = pre_seq_len
    model.config.prefix_projection = prefix_projection
    device = transformer.word_embeddings.weight.device
    transformer.prefix_encoder = ChatGLMPrefixEncoder(model.config).to(device=device, dtype=torch.float32)
    return transformer.prefix_encoder


def load_prefix_state_dict(model, folder) -> None:
    """The official README's recipe: the checkpoint's `transformer.prefix_encoder.*`, stripped, into the encoder.

    `model` is a ChatGLM built with the checkpoint's pre_seq_len and prefix_projection (strict: a size or a key
    that does not fit raises). The encoder keeps its own dtype and device.
    """
    weights = _prefix_weights_file(folder)
    if weights is None:
        raise FileNotFoundError(f"{folder} holds neither {PREFIX_WEIGHTS_NAME} nor {PREFIX_SAFE_WEIGHTS_NAME}")
    state = _read_state_dict(weights)
    stripped = {key[len(PREFIX_KEY):]: value for key, value in state.items() if key.startswith(PREFIX_KEY)}
    base = getattr(model, "base_model_prefix", None) and getattr(model, model.base_model_prefix, None)
    transformer = base if base is not None else model
    if transformer.prefix_encoder is None:
        raise ValueError("this model has no prefix encoder: build it with the checkpoint's pre_seq_len")
    transformer.prefix_encoder.load_state_dict(stripped)


def save_prefix_checkpoint(model, output_dir, base_model: str | None = None) -> None:
    """The official layout: config.json and pytorch_model.bin of `transformer.prefix_encoder.*` in fp32."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    encoder = model.transformer.prefix_encoder
    state = {PREFIX_KEY + key: value.detach().float().cpu().contiguous() for key, value in encoder.state_dict().items()}
    torch.save(state, output_dir / PREFIX_WEIGHTS_NAME)
    config = model.config.to_dict()
    config["architectures"] = [type(model).__name__]
    if base_model is not None:
        config[BASE_MODEL_KEY] = str(base_model)
    (output_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
