"""The official int4 / int8 ChatGLM-6B checkpoints (THUDM/chatglm-6b-int4, -int8, -int4-qe), loaded natively.

Their config.json carries `quantization_bit` (4 or 8) and, for -int4-qe, `quantization_embeddings: true`. Each linear
of the transformer layers (query_key_value, dense, dense_h_to_4h, dense_4h_to_h) is stored as the official
`quantization.py` writes it:

* `weight_scale` [out] (fp16): the row's absolute maximum / (2**(bits - 1) - 1), i.e. / 127 or / 7;
* `weight` int8: for 8 bits [out, in], the rounded `w / scale`; for 4 bits [out, in / 2], two signed 4-bit values a
  byte, the even column in the high nibble and the odd column in the low one: byte = (q[2j] << 4) | (q[2j+1] & 15);
* `bias` [out] in fp16, as it was.

Dequantized, w[i, j] = weight_scale[i] * q[i, j], which the official kernels compute (`extract_weight_to_half`,
`extract_int4_weight_to_float`: high nibble `byte >> 4`, low nibble `(int8)(byte << 4) >> 4`). -int4-qe stores the word
embedding the same way ([vocab, hidden / 2] with a scale a row), and its lm_head computes with that embedding.

Compute (see README "Small GPUs" for the choice):
* 8 bits: `torch._weight_int8pack_mm`, PyTorch's weight-only int8 matmul (CPU and CUDA; what torchao's int8
  weight-only layout calls): x @ (q * scale).T with the scale a row, the official arithmetic, without materialising the
  dequantized weight. Where the op is missing for a device / dtype, the weight is dequantized for the matmul.
* 4 bits: no maintained kernel takes this layout as it is (torchao's / tinygemm's int4 wants groups of <= 256 columns
  with bf16 scales and zero points, bitsandbytes its own blockwise NF4 / FP4 codes), and converting would change the
  weights the checkpoint holds. The weight is unpacked and scaled in the compute dtype for each matmul, exactly as the
  official W8A16Linear does, on GPU and CPU.

The scales are kept in fp32 whatever dtype the model loads in (fp16 -> fp32 is exact; bf16 would round them).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ThuglmError
from .configuration_chatglm import ChatGLMConfig

QUANTIZED_LINEARS = ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")


class OfficialCheckpointError(ThuglmError, ValueError):
    """An official int4/int8 checkpoint whose tensors are missing or corrupt; the message names the tensor."""


# ---- the format -----------------------------------------------------------------------------------------------------
def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 values in [-8, 7], [rows, 2 * m] -> [rows, m] int8: column 2j in the high nibble, 2j + 1 in the low."""
    if q.shape[-1] % 2:
        raise ValueError(f"int4 packing needs an even number of columns, got {q.shape[-1]}")
    q = q.to(torch.int16)
    return (((q[..., 0::2] & 15) << 4) | (q[..., 1::2] & 15)).to(torch.uint8).view(torch.int8)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """[rows, m] int8 -> [rows, 2 * m] int8 in [-8, 7]: the signed high nibble, then the signed low nibble."""
    wide = packed.to(torch.int16)
    high = wide >> 4  # arithmetic shift of the signed byte: the high nibble, sign included
    low = ((wide & 15) ^ 8) - 8  # the low nibble, sign-extended
    return torch.stack((high, low), dim=-1).flatten(-2).to(torch.int8)


def quantize_rows(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The official quantization of a [rows, columns] weight: (int8 weight, packed for 4 bits; fp16 scale a row)."""
    scale = (weight.abs().max(dim=-1).values / (2 ** (bits - 1) - 1)).half()
    q = torch.round(weight / scale[:, None].to(weight.dtype)).to(torch.int8)
    return (pack_int4(q) if bits == 4 else q), scale


def dequantize_rows(weight: torch.Tensor, scale: torch.Tensor, bits: int, dtype: torch.dtype = torch.float32):
    """scale[i] * q[i, j], computed in fp32 (exact for fp16 scales) and rounded once to `dtype`."""
    q = unpack_int4(weight) if bits == 4 else weight
    return (scale.float()[..., None] * q.float()).to(dtype)


# ---- the modules ----------------------------------------------------------------------------------------------------
class _MissingAware(nn.Module):
    """Remembers which of its tensors the checkpoint did not fill, so that the error can name them."""

    weight: nn.Parameter
    weight_scale: nn.Parameter

    def mark_missing(self) -> None:
        """Called by `_init_weights` for a module the checkpoint did not fill completely."""
        for name in ("weight", "weight_scale"):
            if not getattr(getattr(self, name), "_is_hf_initialized", False):
                self._missing.add(name)

    def check(self, name: str) -> None:
        """Raise `OfficialCheckpointError` naming `name.weight_scale` (or `.weight`) if missing or corrupt."""
        if self._missing:
            tensor = min(self._missing)
            raise OfficialCheckpointError(
                f"the int{self.bits} checkpoint has no {name}.{tensor}: the download is incomplete or the file is not "
                "an official int4/int8 ChatGLM-6B checkpoint; fetch its pytorch_model.bin again"
            )
        scale = self.weight_scale
        rows = self.weight.shape[0]
        problem = None
        if scale.shape != (rows,):
            problem = f"has shape {tuple(scale.shape)}, not ({rows},) (one scale a row)"
        elif not torch.isfinite(scale).all():
            problem = "holds NaN or infinite values"
        elif (scale < 0).any():
            problem = "holds negative values"
        elif self.weight.dtype != torch.int8:
            problem = f"comes with a {self.weight.dtype} weight, not int8"
        else:
            zero_rows = (scale == 0) & (self.weight != 0).any(dim=-1)
            if zero_rows.any():
                problem = f"is 0 for {int(zero_rows.sum())} rows whose weights are not"
        if problem:
            raise OfficialCheckpointError(
                f"{name}.weight_scale {problem}: the int{self.bits} checkpoint is corrupt; fetch it again"
            )
        self._checked = True


class OfficialQuantizedLinear(_MissingAware):
    """A linear stored as the official int4/int8 checkpoints store it (see the module docstring)."""

    def __init__(self, in_features: int, out_features: int, bits: int, bias: bool = True):
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(f"quantization_bit must be 4 or 8, got {bits}")
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.weight = nn.Parameter(torch.empty(out_features, in_features * bits // 8, dtype=torch.int8),
                                   requires_grad=False)
        self.weight_scale = nn.Parameter(torch.empty(out_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self._missing: set[str] = set()
        self._checked = False
        self._int8_kernel = bits == 8

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}"

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_rows(self.weight, self.weight_scale, self.bits, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._checked:
            self.check(getattr(self, "_name", type(self).__name__))
        output = None
        if self._int8_kernel and not torch.is_grad_enabled():
            try:  # PyTorch's weight-only int8 matmul: x @ (q * scale).T, one scale a row
                flat = x.reshape(-1, x.shape[-1])
                output = torch._weight_int8pack_mm(flat, self.weight, self.weight_scale.to(x.dtype))
                output = output.reshape(*x.shape[:-1], self.out_features)
            except (RuntimeError, NotImplementedError):
                self._int8_kernel = False  # no such kernel for this device / dtype: dequantize instead
        if output is None:
            output = nn.functional.linear(x, self.dequantized_weight(x.dtype))
        return output if self.bias is None else output + self.bias.to(output.dtype)


class OfficialQuantizedEmbedding(_MissingAware):
    """-int4-qe's word embedding: rows stored as the linears' (4 bits packed, a scale a row); looked up, then scaled."""

    def __init__(self, num_embeddings: int, embedding_dim: int, bits: int, dtype: torch.dtype | None = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.bits = num_embeddings, embedding_dim, bits
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim * bits // 8, dtype=torch.int8),
                                   requires_grad=False)
        self.weight_scale = nn.Parameter(torch.empty(num_embeddings), requires_grad=False)
        # Empty, and cast with the model (`model.to(torch.bfloat16)`): the dtype the looked-up rows come out in.
        self.register_buffer("dtype_probe", torch.empty(0, dtype=dtype or torch.get_default_dtype()), persistent=False)
        self._missing: set[str] = set()
        self._checked = False

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}"

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if not self._checked:
            self.check(getattr(self, "_name", type(self).__name__))
        # Only the rows looked up are dequantized: the same values as the official whole-table extraction.
        return dequantize_rows(self.weight[input_ids], self.weight_scale[input_ids], self.bits, self.dtype_probe.dtype)


class OfficialQuantizedHead(nn.Module):
    """-int4-qe's lm_head: the logits against the quantized word embedding (tied to it, holding nothing itself)."""

    def __init__(self, embedding: OfficialQuantizedEmbedding):
        super().__init__()
        object.__setattr__(self, "_embedding", embedding)  # not a submodule: its tensors belong to the embedding
        self.in_features, self.out_features = embedding.embedding_dim, embedding.num_embeddings
        # The packed table itself, tied as transformers ties lm_head.weight to the word embedding's.
        self.weight = embedding.weight

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        embedding = self._embedding
        weight = dequantize_rows(embedding.weight, embedding.weight_scale, embedding.bits, hidden_states.dtype)
        return nn.functional.linear(hidden_states, weight)


# ---- the registration -----------------------------------------------------------------------------------------------
def use_official_quantized_layout(model: nn.Module, config: ChatGLMConfig) -> None:
    """Swap the linears (and with `quantization_embeddings` the embedding and lm_head) of a freshly built ChatGLM for
    the official packed layout, so that an int4/int8 checkpoint loads into it as it is. Idempotent: ChatGLMModel and
    ChatGLMForConditionalGeneration both call it from `post_init`."""
    bits = config.quantization_bit
    if bits not in (4, 8):
        raise NotImplementedError(f"quantization_bit={bits}: the official checkpoints are int4 or int8")
    embeddings = bool(getattr(config, "quantization_embeddings", False))
    transformer = getattr(model, "transformer", model)
    for layer in transformer.layers:
        for path in QUANTIZED_LINEARS:
            parent_name, name = path.split(".")
            parent = getattr(layer, parent_name)
            linear = getattr(parent, name)
            if isinstance(linear, OfficialQuantizedLinear):
                continue
            setattr(parent, name,
                    OfficialQuantizedLinear(linear.in_features, linear.out_features, bits, linear.bias is not None))
    if embeddings and not isinstance(transformer.word_embeddings, OfficialQuantizedEmbedding):
        old = transformer.word_embeddings
        transformer.word_embeddings = OfficialQuantizedEmbedding(old.num_embeddings, old.embedding_dim, bits,
                                                                 dtype=old.weight.dtype)
    if embeddings and hasattr(model, "lm_head") and not isinstance(model.lm_head, OfficialQuantizedHead):
        model.lm_head = OfficialQuantizedHead(transformer.word_embeddings)
    for name, module in model.named_modules():  # the names its errors give (the checkpoint's keys)
        if isinstance(module, _MissingAware):
            module._name = name
    # Loading: scales stay fp32 in a bf16/fp16 model; the lm_head's copies of the embedding's tensors (the official
    # -qe model saves them under lm_head too) are the embedding's own.
    model._keep_in_fp32_modules_strict = {*(model._keep_in_fp32_modules_strict or ()), "weight_scale"}
    if embeddings:
        model._keys_to_ignore_on_load_unexpected = [*(model._keys_to_ignore_on_load_unexpected or ()),
                                                    r"^lm_head\.weight_scale$"]


def check_official_checkpoint(model: nn.Module) -> None:
    """Raise `OfficialCheckpointError` naming the first missing or corrupt quantized tensor (the forward pass checks
    too; this checks at once, right after loading)."""
    for name, module in model.named_modules():
        if isinstance(module, _MissingAware):
            module.check(getattr(module, "_name", name))
