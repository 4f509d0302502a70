"""ChatGLM-6B configuration: reads the official `config.json` unchanged."""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

ROPE_TYPES = ("default", "linear")
"""The rotary variants ChatGLM runs: the official one, and `linear` (position interpolation: every position divided
by `factor`, so rows `factor` times the trained length see the positions the model knows)."""


def standard_rope_parameters(value: dict[str, Any] | None) -> dict[str, Any] | None:
    """`rope_parameters` (transformers' name; `rope_scaling` and its `type` key are the older spellings) as
    `{"rope_type": "linear", "factor": float}`, or None for the official rotary; anything else is refused."""
    if not value:
        return None
    if not isinstance(value, dict):
        raise ValueError(f"rope_parameters must be a mapping such as {{'rope_type': 'linear', 'factor': 8}}; "
                         f"got {value!r}")
    rope_type = value.get("rope_type", value.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"rope_parameters: rope_type {rope_type!r} is not one ChatGLM runs; use one of "
                         f"{', '.join(ROPE_TYPES)}")
    if rope_type == "default":
        return None
    factor = value.get("factor")
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor < 1:
        raise ValueError(f"rope_parameters: a {rope_type} rotary needs a factor of at least 1; got {factor!r}")
    return {"rope_type": rope_type, "factor": float(factor)}


class ChatGLMConfig(PretrainedConfig):
    """Configuration of ChatGLM-6B (model_type `chatglm`), with the official names and defaults.

    The official `config.json` also carries an `auto_map` pointing at remote code; thuglm registers this class with
    `AutoConfig` under `chatglm`, so that map is never needed and `trust_remote_code` stays off.
    """

    model_type = "chatglm"
    keys_to_ignore_at_inference = ["past_key_values"]
    attribute_map = {"num_hidden_layers": "num_layers", "intermediate_size": "inner_hidden_size"}

    def __init__(
        self,
        vocab_size: int = 130528,
        hidden_size: int = 4096,
        num_layers: int = 28,
        num_attention_heads: int = 32,
        layernorm_epsilon: float = 1e-5,
        use_cache: bool = True,
        bos_token_id: int = 130004,
        eos_token_id: int = 130005,
        mask_token_id: int = 130000,
        gmask_token_id: int = 130001,
        pad_token_id: int = 3,
        max_sequence_length: int = 2048,
        inner_hidden_size: int = 16384,
        position_encoding_2d: bool = True,
        quantization_bit: int = 0,
        pre_seq_len: int | None = None,
        prefix_projection: bool = False,
        tie_word_embeddings: bool = True,
        initializer_range: float = 0.02,
        rope_parameters: dict[str, Any] | None = None,
        **kwargs,
    ):
        # The official config names remote classes; thuglm's own classes serve `model_type: chatglm` instead.
        kwargs.pop("auto_map", None)
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.num_attention_heads = num_attention_heads
        self.layernorm_epsilon = layernorm_epsilon
        self.use_cache = use_cache
        self.mask_token_id = mask_token_id
        self.gmask_token_id = gmask_token_id
        self.max_sequence_length = max_sequence_length
        self.inner_hidden_size = inner_hidden_size
        self.position_encoding_2d = position_encoding_2d
        self.quantization_bit = quantization_bit
        self.pre_seq_len = pre_seq_len
        self.prefix_projection = prefix_projection
        self.initializer_range = initializer_range
        super().__init__(
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        # After the base class, which turns a config.json's older `rope_scaling` into `rope_parameters`.
        self.rope_parameters = standard_rope_parameters(rope_parameters or self.__dict__.get("rope_parameters"))

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        if output.get("rope_parameters") is None:  # the official rotary: config.json stays as the official one
            output.pop("rope_parameters", None)
        return output

    @property
    def rope_factor(self) -> float:
        """How much the rotary's positions are divided by: 1 for the official rotary."""
        return self.rope_parameters["factor"] if self.rope_parameters else 1.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads
