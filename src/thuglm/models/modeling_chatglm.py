"""ChatGLM-6B for current transformers, without remote code.

The math is the official `modeling_chatglm.py`'s (THUDM/chatglm-6b), written the way transformers writes its own
models: batch-first tensors, attention behind `ALL_ATTENTION_FUNCTIONS` (eager and sdpa), the KV cache in a
`transformers.Cache`, gradient checkpointing through `GradientCheckpointingLayer`. Parameter names are the
official checkpoint's, so its `pytorch_model-*.bin` shards load as they are.

What makes GLM different from a GPT:
* 2D rotary embeddings: each head's first half is rotated by the position, its second half by the block position
  (see `masking.py` for both, and for the prefix-LM mask);
* post-LayerNorm residuals scaled by alpha = sqrt(2 * 28): `h = LN(x) * alpha + f(LN(x))` (28 whatever the
  depth: see `RESIDUAL_SCALE`);
* attention scores of layer i are computed on q / (sqrt(d) * (i + 1)) and scaled back in fp32, so fp16 never
  overflows (the eager path keeps this; sdpa computes in fp32 internally);
* a tanh-approximated GELU MLP, and an lm_head tied to the word embeddings.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Iterator
from queue import Queue
from typing import Any

import torch
from torch import nn
from transformers import GenerationConfig, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation.configuration_utils import GenerationMode
from transformers.generation.logits_process import LogitsProcessor, LogitsProcessorList
from transformers.generation.stopping_criteria import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    SequenceClassifierOutputWithPast,
    TokenClassifierOutput,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .prompt import answer_token_ids, build_prompt, process_response
from .configuration_chatglm import ChatGLMConfig
from .decoding import sample_without_host_sync
from .losses import linear_cross_entropy
from .masking import glm_attention_mask, glm_block_mask, glm_decode_mask, glm_position_ids, glm_static_cache_mask
from .prefix import ChatGLMPrefixEncoder, widen_for_prefix
from .quantization import OfficialQuantizedEmbedding, OfficialQuantizedLinear, use_official_quantized_layout

# transformers renamed the `past_key_values` argument and output field to `cache` during 5.x (the old name is
# deprecated until 5.40). thuglm supports 5.17 onwards, so it accepts both and returns the field of the installed one.
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def _cache_argument(past_key_values: Cache | None, kwargs: dict) -> Cache | None:
    cache = kwargs.pop("cache", None)
    return past_key_values if past_key_values is not None else cache


class ChatGLMRotaryEmbedding(nn.Module):
    """cos/sin tables for GLM's two rotary halves, looked up at the position and the block position."""

    def __init__(self, config: ChatGLMConfig, base: float = 10000.0):
        super().__init__()
        self.dim = config.head_dim // 2
        self.base = base
        self.factor = config.rope_factor  # linear scaling (position interpolation): positions / factor
        self._inv_freq: dict[torch.device, torch.Tensor] = {}

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        # The official code rounds the frequencies through fp16; keep exactly those frequencies (a linear scaling
        # divides them after; by 1, exactly). Kept out of the module's buffers, so that casting the model to bf16/fp16
        # never coarsens them further and loading on the meta device never leaves them empty.
        if device not in self._inv_freq:
            exponents = torch.arange(0, self.dim, 2, dtype=torch.float32) / self.dim
            self._inv_freq[device] = ((1.0 / (self.base**exponents)).half().float() / self.factor).to(device)
        return self._inv_freq[device]

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [batch, 2, seq] -> cos, signed sin [batch, seq, 1, 1, head_dim] in x's dtype, for
        `apply_glm_rotary`: the first half of a head's dimensions rotates by the position, the second by the block
        position, and within each half the sine of the first quarter is negated (rotate-half's minus sign)."""
        freqs = position_ids[..., None].float() * self.inv_freq(position_ids.device)  # [batch, 2, seq, dim / 2]
        sin = freqs.sin()
        cos = torch.cat((freqs, freqs), dim=-1).cos()
        signed_sin = torch.cat((-sin, sin), dim=-1)
        # [batch, 2 halves, seq, dim] -> [batch, seq, head_dim], broadcast over heads and over (query, key).
        cos, signed_sin = (t.transpose(1, 2).flatten(2)[:, :, None, None, :].to(x.dtype) for t in (cos, signed_sin))
        return cos, signed_sin


def swap_quarters(x: torch.Tensor) -> torch.Tensor:
    """[x1 x2 | x3 x4] -> [x2 x1 | x4 x3] over the last dimension: rotate-half within each half, its sign left to
    the signed sine."""
    return x.unflatten(-1, (2, 2, -1)).flip(-2).flatten(-3)


def apply_glm_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """GLM's 2D rotary on x [..., head_dim] with the tables of `ChatGLMRotaryEmbedding`.

    The official code rotates each half by its own position and concatenates; this computes the same products
    (x * cos + rotate_half(x) * sin, each half alike, -a * b written as a * -b) as four kernels over both halves at
    once, and over query and key together: the fewer kernels are what an eager step at small batch waits on."""
    return x * cos + swap_quarters(x) * signed_sin


def glm_eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The official attention: scores of layer i on q / (sqrt(d) * (i + 1)), rescaled and softmaxed in fp32."""
    coeff = float(module.layer_idx + 1)
    scores = torch.matmul(query * (scaling / coeff), key.transpose(2, 3)).float() * coeff
    if attention_mask is not None:
        scores = scores + attention_mask
    probs = nn.functional.softmax(scores, dim=-1).to(query.dtype)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    output = torch.matmul(probs, value).transpose(1, 2).contiguous()
    return output, probs


class ChatGLMAttention(nn.Module):
    def __init__(self, config: ChatGLMConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.scaling = self.head_dim**-0.5
        self.is_causal = False  # the mask is GLM's prefix-LM mask, always passed explicitly
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        past_key_values: Cache | None = None,
        prefix_key_value: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch, seq, _ = hidden_states.shape
        # The fused projection is laid out per head as [q | k | v], as in the official checkpoint.
        mixed = self.query_key_value(hidden_states).view(batch, seq, self.num_heads, 3, self.head_dim)
        query_key, value = mixed.split((2, 1), dim=3)  # one split: its gradient is one concatenation
        query, key = apply_glm_rotary(query_key, *position_embeddings).unbind(3)
        query, key, value = (t.transpose(1, 2) for t in (query, key, value.squeeze(3)))
        if past_key_values is not None:
            key, value = past_key_values.update(key, value, self.layer_idx)
        if prefix_key_value is not None:  # P-Tuning v2: the prefix's keys and values come first (see prefix.py)
            key = torch.cat([prefix_key_value[0], key], dim=2)
            value = torch.cat([prefix_key_value[1], value], dim=2)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, glm_eager_attention_forward
        )
        output, weights = attention_interface(
            self, query, key, value, attention_mask, scaling=self.scaling, dropout=0.0, is_causal=False, **kwargs
        )
        return self.dense(output.reshape(batch, seq, -1)), weights


class ChatGLMMLP(nn.Module):
    def __init__(self, config: ChatGLMConfig):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.inner_hidden_size)
        self.dense_4h_to_h = nn.Linear(config.inner_hidden_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(nn.functional.gelu(self.dense_h_to_4h(hidden_states), approximate="tanh"))


class ChatGLMLayerNorm(nn.LayerNorm):
    """A LayerNorm whose output keeps its input's dtype.

    CUDA autocast runs layer_norm in fp32 and returns fp32. GLM's residual is the normalised input, so under a bf16
    run's autocast the whole residual stream would turn fp32 from the first layer on: every checkpointed layer input
    twice the bytes, and a cast back to bf16 before each matmul. The official code, run in half precision, keeps the
    stream in half; so does this (the normalisation itself is still computed in fp32, as the half kernel does too).
    """

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return super().forward(hidden_states).to(hidden_states.dtype)


# The official GLMBlock computes alpha = sqrt(2 * num_layers) from a constructor default of 28 that ChatGLMModel
# never overrides, so every checkpoint in this format, whatever its depth, was trained and runs with sqrt(56).
# For ChatGLM-6B (28 layers) this is sqrt(2 * num_layers); for smaller models it is what the official code computes.
RESIDUAL_SCALE = (2 * 28) ** 0.5


class ChatGLMBlock(GradientCheckpointingLayer):
    def __init__(self, config: ChatGLMConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = ChatGLMLayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.attention = ChatGLMAttention(config, layer_idx)
        self.post_attention_layernorm = ChatGLMLayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.mlp = ChatGLMMLP(config)
        self.residual_scale = RESIDUAL_SCALE

    def __call__(self, *args, **kwargs):
        # Without autograd (a reference model's no_grad forward in training mode, as DPO's) there is nothing to
        # recompute: run the layer as is, rather than through a reentrant checkpoint that would warn of inputs
        # without gradients. transformers 5.2x's GradientCheckpointingLayer does the same; 5.17's does not.
        if self.gradient_checkpointing and self.training and not torch.is_grad_enabled():
            return nn.Module.__call__(self, *args, **kwargs)
        return super().__call__(*args, **kwargs)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        prefix_key_value: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool | None = False,
        **kwargs,
    ) -> torch.Tensor:
        """prefix_key_value: this layer's P-Tuning keys and values [2, batch, heads, pre_seq_len, head_dim], or None.
        Positional, so that reentrant gradient checkpointing passes its gradient on."""
        # GLM's residual is the *normalised* input, scaled up (DeepNorm-style), not the raw input.
        attention_input = self.input_layernorm(hidden_states)
        attention_output, _ = self.attention(
            attention_input, position_embeddings, attention_mask, past_key_values=past_key_values,
            prefix_key_value=prefix_key_value, **kwargs
        )
        hidden_states = attention_input * self.residual_scale + attention_output
        mlp_input = self.post_attention_layernorm(hidden_states)
        return mlp_input * self.residual_scale + self.mlp(mlp_input)


OFFICIAL_QUANTIZED = (OfficialQuantizedLinear, OfficialQuantizedEmbedding)


class ChatGLMPreTrainedModel(PreTrainedModel):
    config_class = ChatGLMConfig
    config: ChatGLMConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["ChatGLMBlock"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True
    _supports_flash_attn = False  # GLM's prefix-LM mask is not causal; flash kernels only take causal masks
    _supports_flex_attn = True  # with GLM's mask as a BlockMask (masking.glm_block_mask); GPU only for training
    _supports_attention_backend = False
    _can_compile_fullgraph = True  # decoding with a static cache traces as one graph (tests/models/test_fast_decode.py)
    # Old checkpoints store each layer's rotary table; it is a pure function of the config.
    _keys_to_ignore_on_load_unexpected = [r"rotary_emb\.inv_freq"]
    _can_record_outputs = {"hidden_states": ChatGLMBlock, "attentions": ChatGLMAttention}

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if getattr(module, "official_torch_init", False):
            # A new P-Tuning prefix starts as the official one does, from torch's defaults (the official model
            # initialises nothing itself): N(0, 1) slots, and nn.Linear's own initialisation in `trans`.
            if isinstance(module, nn.Embedding):
                init.normal_(module.weight, mean=0.0, std=1.0)
            elif isinstance(module, nn.Linear):
                init.kaiming_uniform_(module.weight, a=5**0.5)
                bound = module.in_features**-0.5
                init.uniform_(module.bias, -bound, bound)
        elif isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, OFFICIAL_QUANTIZED):  # an int4/int8 tensor the checkpoint lacks: named when used
            module.mark_missing()

    def post_init(self) -> None:
        if self.config.quantization_bit:  # an official int4/int8 checkpoint: its packed layout (quantization.py)
            use_official_quantized_layout(self, self.config)
        super().post_init()


class ChatGLMModel(ChatGLMPreTrainedModel):
    def __init__(self, config: ChatGLMConfig):
        super().__init__(config)
        if not config.position_encoding_2d:
            raise NotImplementedError(
                "position_encoding_2d=false is not a released ChatGLM-6B variant; thuglm implements the 2D positions "
                "that every ChatGLM-6B checkpoint uses."
            )
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(ChatGLMBlock(config, i) for i in range(config.num_layers))
        self.final_layernorm = ChatGLMLayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.rotary_emb = ChatGLMRotaryEmbedding(config)
        # P-Tuning v2 (the official `ptuning/`): trained keys and values in front of every layer's (see prefix.py).
        self.prefix_encoder = ChatGLMPrefixEncoder(config) if config.pre_seq_len else None
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.word_embeddings = value

    @property
    def prefix_length(self) -> int:
        """P-Tuning's pre_seq_len when this model has a prefix encoder, else 0."""
        return self.prefix_encoder.pre_seq_len if self.prefix_encoder is not None else 0

    def derive_position_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """GLM position ids from the token ids, as the official code derives them (see `masking.py`)."""
        config = self.config
        return glm_position_ids(
            input_ids, attention_mask, config.bos_token_id, config.mask_token_id, config.gmask_token_id, strict=True
        )

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """
        attention_mask: 2D [batch, past + seq]: 1 for tokens, 0 for padding, or sample numbers 1, 2, ... for packed
            rows (see `masking.py`); or a ready 4D additive mask [batch, 1, seq, past + seq].
        position_ids: [batch, 2, seq] position and block position. Derived from input_ids when absent (not
            possible with a non-empty cache or with inputs_embeds alone).
        """
        past_key_values = _cache_argument(past_key_values, kwargs)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if self.gradient_checkpointing and self.training:
            use_cache = False  # recomputed layers must not append to a cache a second time
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        # A static cache counts its tokens in a device tensor: read it only where the mask or positions need it (a
        # ready 4D mask from generate needs neither), so compiled decoding never syncs or breaks its graph.
        static_cache = past_key_values is not None and past_key_values.is_compileable
        needs_past_length = position_ids is None or attention_mask is None or attention_mask.dim() != 4
        past_length = 0
        if past_key_values is not None and needs_past_length:
            past_length = int(past_key_values.get_seq_length())

        if position_ids is None:
            if input_ids is None or past_length:
                raise ValueError(
                    "ChatGLM needs position_ids [batch, 2, seq] here: they can be derived from input_ids only "
                    "for a whole sequence without cache."
                )
            query_mask = attention_mask if attention_mask is None or attention_mask.dim() == 2 else None
            position_ids = self.derive_position_ids(input_ids, query_mask)
        elif position_ids.dim() != 3 or position_ids.shape[1] != 2:
            raise ValueError(
                f"ChatGLM position_ids have shape [batch, 2, seq] (position, block position); got "
                f"{tuple(position_ids.shape)}. The tokenizer returns them in this shape."
            )

        if attention_mask is not None and attention_mask.dim() == 4:
            mask = attention_mask
        elif static_cache:
            if attention_mask is None:
                attention_mask = torch.ones(
                    inputs_embeds.shape[0], past_length + inputs_embeds.shape[1], device=inputs_embeds.device
                )
            cache_length, _ = past_key_values.get_mask_sizes(inputs_embeds.shape[1], 0)
            mask = glm_static_cache_mask(position_ids, attention_mask, cache_length, inputs_embeds.dtype)
        elif self.config._attn_implementation == "flex_attention":
            mask = glm_block_mask(position_ids, attention_mask, past_length, prefix_length=self.prefix_length)
        elif inputs_embeds.shape[1] == 1 and past_length:
            # One decoded token sees its whole sample: no [b, 1, s, s] rule to evaluate.
            mask = None if attention_mask is None else glm_decode_mask(attention_mask, inputs_embeds.dtype)
        else:
            mask = glm_attention_mask(position_ids, attention_mask, past_length, inputs_embeds.dtype)

        prefix = None
        if self.prefix_encoder is not None:
            prefix = self.prefix_encoder(inputs_embeds.shape[0], inputs_embeds.dtype)
            mask = widen_for_prefix(mask, self.prefix_length)  # a flex BlockMask was built with the prefix
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids)
        hidden_states = inputs_embeds
        for index, layer in enumerate(self.layers):
            hidden_states = layer(
                hidden_states,
                position_embeddings,
                None if prefix is None else prefix[index],
                attention_mask=mask,
                past_key_values=past_key_values,
                use_cache=use_cache,
                **kwargs,
            )
        hidden_states = self.final_layernorm(hidden_states)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states, **{CACHE_FIELD: past_key_values if use_cache else None}
        )


# Static caches are sized up to a multiple of this, so that chat turns of different lengths reuse one compiled step.
STATIC_CACHE_BUCKET = 256


def fast_decoding_kwargs(
    device: torch.device,
    prompt_length: int,
    generate_kwargs: dict,
    default_max_length: int | None = None,
    generation_config: GenerationConfig | None = None,
) -> dict:
    """generate() arguments for the fast decoding path, where it is safe: on CUDA, unless the caller chose a cache.

    The path is a static KV cache, whose fixed shapes let transformers compile the decode step (CUDA graphs): many
    times the default dynamic cache's tokens/s on the 6B shape (benchmarks/README.md, "Greedy decoding"). The
    tokens are the dynamic cache's (tests/models/test_fast_decode.py). The first call of a cache size compiles (the
    compile time is in the same section); sizes are rounded up to a multiple of 256 so later calls reuse it. Greedy
    decoding and sampling also take `decoding.sample_without_host_sync`, which keeps the host a step ahead of the GPU
    (same tokens).
    """
    chosen = {"cache_implementation", "past_key_values", "cache", "use_cache", "max_cache_len", "custom_generate"}
    if torch.device(device).type != "cuda" or chosen & set(generate_kwargs) or generate_kwargs.get("num_beams", 1) > 1:
        return {}
    new_tokens = generate_kwargs.get("max_new_tokens")
    total = prompt_length + new_tokens if new_tokens is not None else generate_kwargs.get("max_length")
    total = total or default_max_length
    if not total:
        return {}
    bucket = -(-total // STATIC_CACHE_BUCKET) * STATIC_CACHE_BUCKET
    fast = {"cache_implementation": "static", "max_cache_len": bucket}
    if _greedy_or_sampling(generate_kwargs, generation_config):
        fast["custom_generate"] = sample_without_host_sync
    return fast


def _greedy_or_sampling(generate_kwargs: dict, generation_config: GenerationConfig | None) -> bool:
    """Whether generate would run plain greedy decoding or sampling (what `sample_without_host_sync` does)."""
    # generate hands a custom loop neither the streamer nor synced_gpus (needed when several processes generate).
    several_processes = torch.distributed.is_available() and torch.distributed.is_initialized() and (
        torch.distributed.get_world_size() > 1)
    if generate_kwargs.get("streamer") is not None or "assistant_model" in generate_kwargs or several_processes:
        return False
    config = copy.deepcopy(generation_config) if generation_config is not None else GenerationConfig()
    config.update(**{key: value for key, value in generate_kwargs.items() if hasattr(config, key)})
    return config.get_generation_mode() in (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE)


class InvalidScoreLogitsProcessor(LogitsProcessor):
    """The official chat's guard: if fp16 logits overflowed, emit token 5 rather than crash in sampling.

    As the official one, any NaN or inf anywhere in the batch replaces every row; written as a `where` rather than
    an `if`, so that no step waits for the GPU to answer whether there was one.
    """

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        overflowed = ~torch.isfinite(scores).all()
        fallback = torch.zeros_like(scores[:1])
        fallback[..., 5] = 5e4
        return torch.where(overflowed, fallback, scores)


class _TokenQueueStreamer(BaseStreamer):
    """Hands each step's new token ids from `generate` (running in a thread) to the caller."""

    def __init__(self):
        self.queue: Queue = Queue()
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate first puts the prompt
            self.prompt_seen = True
            return
        self.queue.put(value.reshape(-1).tolist())

    def end(self) -> None:
        self.queue.put(None)


class _StopWhenSet(StoppingCriteria):
    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class ChatGLMForConditionalGeneration(ChatGLMPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "transformer.word_embeddings.weight"}

    def __init__(self, config: ChatGLMConfig):
        super().__init__(config)
        self.transformer = ChatGLMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        skip_logits: bool | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """labels: [batch, seq], -100 where no loss is taken; shifted inside (token t predicts t + 1).

        skip_logits: take the loss straight from the hidden states, in chunks, and return no logits (`losses.py`).
            By default on when training with labels: the [tokens, 130,528] fp32 logits are the largest activation.
        """
        past_key_values = _cache_argument(past_key_values, kwargs)
        outputs: BaseModelOutputWithPast = self.transformer(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        if skip_logits is None:
            every_position = isinstance(logits_to_keep, int) and logits_to_keep == 0
            # A plain linear head only: a head that peft wraps (LoRA on lm_head) must run its own forward.
            plain_head = type(self.lm_head) is nn.Linear
            skip_logits = (labels is not None and self.training and torch.is_grad_enabled() and every_position
                           and plain_head)
        if skip_logits:
            if labels is None:
                raise ValueError("skip_logits=True computes the loss only: pass labels")
            logits = None
            loss = linear_cross_entropy(hidden_states, self.lm_head.weight, labels, kwargs.get("num_items_in_batch"))
        else:
            # Only the positions asked for get logits: with a 130,528-token vocabulary these dominate memory.
            keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
            logits = self.lm_head(hidden_states[:, keep, :])
            loss = None
            if labels is not None:
                loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **{CACHE_FIELD: getattr(outputs, CACHE_FIELD)},
        )

    # ---- generation: GLM's 2D positions ----------------------------------------------------------------------
    def _prepare_position_ids_for_generation(self, inputs_tensor: torch.Tensor, model_kwargs: dict) -> torch.Tensor:
        attention_mask = model_kwargs.get("attention_mask")
        if attention_mask is not None and attention_mask.dim() != 2:
            attention_mask = None
        return self.transformer.derive_position_ids(inputs_tensor, attention_mask)

    def _update_model_kwargs_for_generation(
        self, outputs, model_kwargs: dict[str, Any], is_encoder_decoder: bool = False, num_new_tokens: int = 1
    ) -> dict[str, Any]:
        # A generated token keeps the [gMASK] position and advances the block position.
        position_ids = model_kwargs.pop("position_ids", None)
        model_kwargs = super()._update_model_kwargs_for_generation(
            outputs, model_kwargs, is_encoder_decoder=is_encoder_decoder, num_new_tokens=num_new_tokens
        )
        if position_ids is not None:
            last = position_ids[..., -1:]
            steps = torch.arange(1, num_new_tokens + 1, device=position_ids.device)
            new = torch.stack([last[:, 0].expand(-1, num_new_tokens), last[:, 1] + steps], dim=1)
            model_kwargs["position_ids"] = torch.cat([position_ids, new], dim=-1)
        return model_kwargs

    def create_masks_for_generate(
        self, config, inputs_embeds, attention_mask, past_key_values=None, position_ids=None, **kwargs
    ) -> torch.Tensor:
        """GLM's 4D mask over a static cache, built by generate outside the compiled step (transformers' hook).

        Decode steps take `glm_decode_mask`'s few kernels, so the compiled forward sees inputs of fixed shapes.
        transformers 5.2x passes the cache as `cache` (earlier: `past_key_values`).
        """
        past_key_values = _cache_argument(past_key_values, kwargs)
        if attention_mask is None or attention_mask.dim() != 2 or position_ids is None or past_key_values is None:
            return attention_mask
        cache_length, _ = past_key_values.get_mask_sizes(inputs_embeds.shape[1], 0)
        return glm_static_cache_mask(position_ids, attention_mask, cache_length, inputs_embeds.dtype)

    def fast_decoding_kwargs(self, prompt_length: int, generate_kwargs: dict) -> dict:
        """`fast_decoding_kwargs` for this model's device and generation config (chat, thuglm generate)."""
        return fast_decoding_kwargs(
            self.device, prompt_length, generate_kwargs, self.generation_config.max_length, self.generation_config
        )

    # ---- chat, as the official model offers it --------------------------------------------------------------
    def _chat_generation_kwargs(self, logits_processor, max_length, do_sample, top_p, temperature, kwargs):
        processors = LogitsProcessorList(logits_processor or [])
        processors.append(InvalidScoreLogitsProcessor())
        sampling = {"top_p": top_p, "temperature": temperature} if do_sample else {}
        # max_new_tokens, when given, bounds the answer instead of max_length (passing both makes generate warn).
        length = {} if kwargs.get("max_new_tokens") is not None else {"max_length": max_length}
        return {**length, "do_sample": do_sample, "logits_processor": processors, **sampling, **kwargs}

    @torch.no_grad()
    def chat(
        self,
        tokenizer,
        query: str,
        history: list[tuple[str, str]] | None = None,
        max_length: int = 2048,
        num_beams: int = 1,
        do_sample: bool = True,
        top_p: float = 0.7,
        temperature: float = 0.95,
        logits_processor=None,
        system: str | None = None,
        **kwargs,
    ) -> tuple[str, list[tuple[str, str]]]:
        """Answer `query` after the earlier rounds in `history` (and a `system` text first, see `build_prompt`); returns
        the answer and the extended history."""
        history = list(history or [])
        gen_kwargs = self._chat_generation_kwargs(logits_processor, max_length, do_sample, top_p, temperature, kwargs)
        inputs = tokenizer([build_prompt(query, history, system)], return_tensors="pt").to(self.device)
        prompt_length = inputs["input_ids"].shape[1]
        gen_kwargs.update(self.fast_decoding_kwargs(prompt_length, {**gen_kwargs, "num_beams": num_beams}))
        outputs = self.generate(**inputs, num_beams=num_beams, **gen_kwargs)
        answer = answer_token_ids(outputs[0, inputs["input_ids"].shape[1] :].tolist(), self.generation_config.eos_token_id)
        response = process_response(tokenizer.decode(answer))
        return response, history + [(query, response)]

    @torch.no_grad()
    def stream_chat(
        self,
        tokenizer,
        query: str,
        history: list[tuple[str, str]] | None = None,
        max_length: int = 2048,
        do_sample: bool = True,
        top_p: float = 0.7,
        temperature: float = 0.95,
        logits_processor=None,
        system: str | None = None,
        **kwargs,
    ) -> Iterator[tuple[str, list[tuple[str, str]]]]:
        """Like `chat`, yielding (answer so far, history with it) after every generated token."""
        history = list(history or [])
        gen_kwargs = self._chat_generation_kwargs(logits_processor, max_length, do_sample, top_p, temperature, kwargs)
        inputs = tokenizer([build_prompt(query, history, system)], return_tensors="pt").to(self.device)
        streamer = _TokenQueueStreamer()
        gen_kwargs.update(self.fast_decoding_kwargs(inputs["input_ids"].shape[1], {**gen_kwargs, "streamer": streamer}))
        stop = threading.Event()  # set when the caller stops iterating, so generation stops too
        stopping = StoppingCriteriaList(gen_kwargs.pop("stopping_criteria", None) or [])
        stopping.append(_StopWhenSet(stop))
        errors: list[BaseException] = []

        def run() -> None:
            try:
                self.generate(**inputs, streamer=streamer, stopping_criteria=stopping, **gen_kwargs)
            except BaseException as error:  # re-raised in the caller's thread below
                errors.append(error)
                streamer.end()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        eos = self.generation_config.eos_token_id
        eos = {eos} if isinstance(eos, int) else set(eos or [])
        generated: list[int] = []
        try:
            while (tokens := streamer.queue.get()) is not None:
                if tokens[0] in eos:  # the official stream stops before yielding the end token
                    continue
                generated.extend(tokens)
                response = process_response(tokenizer.decode(generated))
                yield response, history + [(query, response)]
        finally:
            stop.set()
            thread.join()
        if errors:
            raise errors[0]


# ---- classification heads ------------------------------------------------------------------------------------------
# Both read a text laid out as the tokenizer lays out one text, `text [gMASK] <sop>`: every text token sits before
# `<sop>`, where GLM attends in both directions, so each token's state has seen the whole text (a GPT's sees only its
# left), and `<sop>` attends to all of them. Conventions are those of transformers' GPT-2 heads: a linear `score` on
# the last hidden states, `config.num_labels` / `id2label` / `label2id` / `problem_type`, transformers' output classes
# and losses (`transformers.loss`). The heads are named `score`, so LoRA trains them through peft's `modules_to_save`.


def last_token_indices(
    input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None, pad_token_id: int | None, batch: int, seq: int
) -> torch.Tensor:
    """Each row's last real position: from a 2D `attention_mask` (0 is padding), else from `pad_token_id`.

    With left padding (the tokenizer's) and with right padding (the training collator's) alike, this is the `<sop>`
    that ends `text [gMASK] <sop>`.
    """
    if attention_mask is not None and attention_mask.dim() == 2:
        real = attention_mask[:, -seq:] != 0
    elif input_ids is not None and pad_token_id is not None:
        real = input_ids != pad_token_id
    else:
        device = input_ids.device if input_ids is not None else None
        return torch.full((batch,), seq - 1, dtype=torch.long, device=device)
    positions = torch.arange(seq, device=real.device)
    return (positions * real).argmax(-1)


class ChatGLMForSequenceClassification(ChatGLMPreTrainedModel):
    """ChatGLM with a linear head on the last real token of each row: `<sop>` in `text [gMASK] <sop>`.

    `<sop>` attends to the whole text, whose tokens read each other both ways. Padding on either side gives the same
    logits (the pooled position is found from `attention_mask`, or from `pad_token_id` without one). One sample a
    row: packed rows (sample numbers in `attention_mask`) are for language modelling.

    labels: [batch] class ids (single_label_classification), [batch, num_labels] floats of 0 / 1
    (multi_label_classification), or [batch] / [batch, num_labels] floats (regression, MSE). `config.problem_type`
    is guessed from the labels when unset, as in transformers (num_labels 1: regression).
    """

    # An official or causal-LM checkpoint carries the tied lm_head; this model has no use for it.
    _keys_to_ignore_on_load_unexpected = [*ChatGLMPreTrainedModel._keys_to_ignore_on_load_unexpected, r"^lm_head\."]
    # Regression and multi-label losses average within the batch, so the Trainer should average over accumulation.
    accepts_loss_kwargs = False

    def __init__(self, config: ChatGLMConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.transformer = ChatGLMModel(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> SequenceClassifierOutputWithPast:
        past_key_values = _cache_argument(past_key_values, kwargs)
        outputs: BaseModelOutputWithPast = self.transformer(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=bool(use_cache),  # a classifier reads the text once; build no cache unless asked
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        batch, seq = hidden_states.shape[:2]
        last = last_token_indices(input_ids, attention_mask, self.config.pad_token_id, batch, seq)
        pooled = hidden_states[torch.arange(batch, device=hidden_states.device), last]
        # The head may be fp32 over a half-precision transformer (fp16 training keeps it so: see
        # thuglm.training.tasks.classification.load_classifier).
        pooled_logits = self.score(pooled.to(self.score.weight.dtype))
        loss = None
        if labels is not None:
            loss = self.loss_function(labels=labels, pooled_logits=pooled_logits, config=self.config)
        return SequenceClassifierOutputWithPast(
            loss=loss,
            logits=pooled_logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **{CACHE_FIELD: getattr(outputs, CACHE_FIELD)},
        )


class ChatGLMForTokenClassification(ChatGLMPreTrainedModel):
    """ChatGLM with a linear head on every token: the logits of a text piece come from its own hidden state.

    Text pieces come before `<sop>` in `text [gMASK] <sop>`, so each is read in the context of the whole text, both
    ways. labels: [batch, seq] class ids, -100 where no loss is taken (`[gMASK]`, `<sop>`, padding, and any piece after
    `<sop>`, which would see only its left).
    """

    _keys_to_ignore_on_load_unexpected = [*ChatGLMPreTrainedModel._keys_to_ignore_on_load_unexpected, r"^lm_head\."]

    def __init__(self, config: ChatGLMConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.transformer = ChatGLMModel(config)
        dropout = getattr(config, "classifier_dropout", None)
        self.dropout = nn.Dropout(0.1 if dropout is None else dropout)
        self.score = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        **kwargs,
    ) -> TokenClassifierOutput:
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)  # labelled pieces over gradient accumulation
        outputs: BaseModelOutputWithPast = self.transformer(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=False,
            **kwargs,
        )
        hidden_states = self.dropout(outputs.last_hidden_state)
        logits = self.score(hidden_states.to(self.score.weight.dtype))  # the head may be fp32, as in the sequence head
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.config, num_items_in_batch=num_items_in_batch)
        return TokenClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )
