"""LoRA's dropout drawn inside the adapter's first product, on a GPU: no dropped copy of each adapted input.

peft computes `lora_B(lora_A(dropout(x)))`. The dropout writes a copy of every adapted layer's input — for
`dense_4h_to_h` 16,384 numbers a token — which `lora_A`'s product then reads, and which (or whose mask) is kept
until the backward, where the weight's gradient reads it again and the input's gradient reads the mask. Here
`lora_A` becomes a `DropoutLinear` whose Triton kernels draw the mask while they read `x`:

* forward: `h = (x * keep) @ A.T / (1 - p)`, reading `x` once and writing `h` ([tokens, r]) and the mask as bits
  (one bit an element: a sixteenth of the dropped copy);
* backward: `dx = (dh @ A) * keep / (1 - p)` and `dA = dh.T @ (x * keep) / (1 - p)` from those bits, so nothing but
  `x`, which the adapter's gradient needs anyway, and the bits are kept, and the mask is drawn once.

The seed is drawn from torch's generator on the device, so the random state that gradient checkpointing replays
before a recomputation (and that compiled graphs take their seeds from) gives the same mask again. The masks are
Philox's, as torch's dropout on a GPU, with the same probability; only which elements fall differs from peft's
`nn.Dropout`, as it does between any two seeds. Half-precision inputs on a CUDA GPU only: elsewhere (a CPU, fp32)
the layer does what peft does.

`lora.fused_dropout: true` turns it on (benchmarks/README.md, issue #23, has what it saves and costs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from peft.tuners.lora import LoraLayer
from torch.library import triton_op, wrap_triton

MASK_COLUMNS = 64  # the columns one mask draw covers (16 Philox offsets x 4 numbers); the input width's divisor
# Run the kernels on CPU tensors too: the tests set it, with TRITON_INTERPRET=1 (Triton's CPU interpreter).
ON_CPU = False


@triton.jit
def _kept(seed, rows, col0, width, p, BLOCK_M: tl.constexpr):
    """Which of x[rows, col0 : col0 + 64] dropout keeps, as a [BLOCK_M, 64] mask: each row's 64 columns from 16
    Philox offsets of 4 uniform numbers each (one offset per 4 elements, as the generator is cheapest used)."""
    offsets = rows[:, None].to(tl.int64) * (width // 4) + col0 // 4 + tl.arange(0, 16)[None, :]
    u0, u1, u2, u3 = tl.rand4x(seed, offsets)
    uniform = tl.reshape(tl.join(tl.join(u0, u1), tl.join(u2, u3)), (BLOCK_M, 64))
    return uniform >= p


@triton.jit
def _packed(keep, BLOCK_M: tl.constexpr):
    """A [BLOCK_M, 64] mask as [BLOCK_M, 2] int32 words, column c of the 64 in bit c % 32 of word c // 32."""
    bits = tl.reshape(keep.to(tl.int32), (BLOCK_M, 2, 32)) << tl.arange(0, 32)[None, None, :]
    return tl.sum(bits, axis=2)  # of distinct bits: their OR


@triton.jit
def _unpacked(words, BLOCK_M: tl.constexpr):
    """`_packed`'s inverse: [BLOCK_M, 2] int32 words to a [BLOCK_M, 64] mask."""
    bits = (words[:, :, None] >> tl.arange(0, 32)[None, None, :]) & 1
    return tl.reshape(bits, (BLOCK_M, 64)) != 0


@triton.jit
def _words(bits_ptr, rows, col0, K):
    """Where the mask of x[rows, col0 : col0 + 64] is kept: its two words a row in the [M, K // 32] int32 words."""
    return bits_ptr + rows[:, None].to(tl.int64) * (K // 32) + col0 // 32 + tl.arange(0, 2)[None, :]


@triton.jit
def _load_kept(bits_ptr, rows, col0, M, K, BLOCK_M: tl.constexpr):
    """The mask of x[rows, col0 : col0 + 64] as the forward stored it."""
    return _unpacked(tl.load(_words(bits_ptr, rows, col0, K), mask=rows[:, None] < M, other=0), BLOCK_M)


@triton.jit
def _forward_kernel(x_ptr, w_ptr, seed_ptr, partial_ptr, bits_ptr, M, K, R, p, scale, columns_per_split,
                    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr):
    """One split of the columns' contribution to h[rows] (fp32, scaled by 1 / (1 - p); the splits are summed
    after), and their mask."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    split = tl.program_id(1)
    ranks = tl.arange(0, BLOCK_R)
    columns = tl.arange(0, 64)
    seed = tl.load(seed_ptr)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for col0 in range(split * columns_per_split, tl.minimum((split + 1) * columns_per_split, K), 64):
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * K + col0 + columns[None, :], mask=rows[:, None] < M,
                    other=0.0)
        keep = _kept(seed, rows, col0, K, p, BLOCK_M)
        tl.store(_words(bits_ptr, rows, col0, K), _packed(keep, BLOCK_M), mask=rows[:, None] < M)
        x = tl.where(keep, x, tl.zeros_like(x))
        w = tl.load(w_ptr + ranks[None, :] * K + col0 + columns[:, None], mask=ranks[None, :] < R, other=0.0)
        acc = tl.dot(x, w, acc)
    tl.store(partial_ptr + split.to(tl.int64) * M * BLOCK_R + rows[:, None] * BLOCK_R + ranks[None, :], acc * scale,
             mask=rows[:, None] < M)


@triton.jit
def _input_grad_kernel(grad_ptr, w_ptr, bits_ptr, dx_ptr, M, K, R, scale,
                       BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    col0 = tl.program_id(1) * 64
    columns = col0 + tl.arange(0, 64)
    ranks = tl.arange(0, BLOCK_R)
    grad = tl.load(grad_ptr + rows[:, None] * R + ranks[None, :], mask=(rows[:, None] < M) & (ranks[None, :] < R),
                   other=0.0)
    w = tl.load(w_ptr + ranks[:, None] * K + columns[None, :], mask=ranks[:, None] < R, other=0.0)
    dx = tl.dot(grad, w) * scale
    dx = tl.where(_load_kept(bits_ptr, rows, col0, M, K, BLOCK_M), dx, 0.0)
    tl.store(dx_ptr + rows[:, None].to(tl.int64) * K + columns[None, :], dx.to(dx_ptr.dtype.element_ty),
             mask=rows[:, None] < M)


@triton.jit
def _weight_grad_kernel(grad_ptr, x_ptr, bits_ptr, partial_ptr, M, K, R, scale, rows_per_split,
                        BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr):
    """One split of the rows' contribution to dA[:, col0 : col0 + 64] (fp32, scaled by 1 / (1 - p); the splits are
    summed after)."""
    col0 = tl.program_id(0) * 64
    split = tl.program_id(1)
    columns = col0 + tl.arange(0, 64)
    ranks = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_R, 64), dtype=tl.float32)
    for row0 in range(split * rows_per_split, tl.minimum((split + 1) * rows_per_split, M), BLOCK_M):
        rows = row0 + tl.arange(0, BLOCK_M)
        grad = tl.load(grad_ptr + rows[:, None] * R + ranks[None, :],
                       mask=(rows[:, None] < M) & (ranks[None, :] < R), other=0.0)
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * K + columns[None, :], mask=rows[:, None] < M, other=0.0)
        x = tl.where(_load_kept(bits_ptr, rows, col0, M, K, BLOCK_M), x, tl.zeros_like(x))
        acc = tl.dot(tl.trans(grad), x, acc)
    tl.store(partial_ptr + split * BLOCK_R * K + ranks[:, None] * K + columns[None, :], acc * scale)


@dataclass(frozen=True)
class Launch:
    """How one of the kernels is launched. The mask and the results do not depend on it, only the speed:
    `benchmarks/check_lora_dropout.py --sweep` times the choices on a GPU."""

    block_rows: int = 64  # the rows a program (forward, input gradient) or a loop step (weight gradient) takes
    num_warps: int = 4
    num_stages: int = 3  # Triton's software pipelining of the column (row) loop
    programs: int = 1024  # where a reduction splits (forward, weight gradient): into enough parts to make this many


FORWARD = Launch()
INPUT_GRAD = Launch()
WEIGHT_GRAD = Launch()


def _splits(programs: int, most: int, target: int) -> int:
    """Into how many parts (at most `most`) to split a reduction that `programs` programs make, to make `target`.
    (torch.sym_*: under torch.compile a size may be symbolic, which Python's min and max would pin to one value.)"""
    return torch.sym_max(1, torch.sym_min(most, target // programs))


def _rank_block(rank: int) -> int:
    return max(16, triton.next_power_of_2(rank))  # tl.dot's smallest side is 16


def forward_partials(x: torch.Tensor, weight: torch.Tensor, seed: torch.Tensor, p: float,
                     launch: Launch | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward kernel alone: h's fp32 partial sums over the column splits, [splits, M, rank block], and the
    mask's words. `launch`: the module's FORWARD unless given."""
    launch = launch or FORWARD
    M, K = x.shape
    R = weight.shape[0]
    block_r = _rank_block(R)
    # The columns split too where the rows alone make too few programs to fill the GPU (a batch of one row);
    # the splits' partial sums are added in a fixed order, so the result is the same from run to run.
    splits = _splits(triton.cdiv(M, launch.block_rows), K // MASK_COLUMNS, launch.programs)
    columns_per_split = triton.cdiv(K // MASK_COLUMNS, splits) * MASK_COLUMNS
    partial = x.new_empty((splits, M, block_r), dtype=torch.float32)
    bits = x.new_empty((M, K // 32), dtype=torch.int32)
    wrap_triton(_forward_kernel)[(triton.cdiv(M, launch.block_rows), splits)](
        x, weight, seed, partial, bits, M, K, R, p, 1.0 / (1.0 - p), columns_per_split, BLOCK_M=launch.block_rows,
        BLOCK_R=block_r, num_warps=launch.num_warps, num_stages=launch.num_stages)
    return partial, bits


def input_grad(grad: torch.Tensor, weight: torch.Tensor, bits: torch.Tensor, p: float,
               launch: Launch | None = None) -> torch.Tensor:
    """The input-gradient kernel: `(grad @ weight) * keep / (1 - p)`. `launch`: INPUT_GRAD unless given."""
    launch = launch or INPUT_GRAD
    M, R = grad.shape
    width = bits.shape[1] * 32
    dx = grad.new_empty((M, width))
    wrap_triton(_input_grad_kernel)[(triton.cdiv(M, launch.block_rows), width // MASK_COLUMNS)](
        grad, weight, bits, dx, M, width, R, 1.0 / (1.0 - p), BLOCK_M=launch.block_rows, BLOCK_R=_rank_block(R),
        num_warps=launch.num_warps, num_stages=launch.num_stages)
    return dx


def weight_grad_partials(grad: torch.Tensor, x: torch.Tensor, bits: torch.Tensor, p: float,
                         launch: Launch | None = None) -> torch.Tensor:
    """The weight-gradient kernel alone: the fp32 partial sums over the row splits, [splits, rank block, K].
    `launch`: WEIGHT_GRAD unless given."""
    launch = launch or WEIGHT_GRAD
    M, K = x.shape
    R = grad.shape[1]
    block_r = _rank_block(R)
    # The rows split where the columns alone make too few programs (fixed order of the partial sums, as above).
    splits = _splits(K // MASK_COLUMNS, triton.cdiv(M, launch.block_rows), launch.programs)
    rows_per_split = triton.cdiv(triton.cdiv(M, splits), launch.block_rows) * launch.block_rows
    partial = x.new_empty((splits, block_r, K), dtype=torch.float32)
    wrap_triton(_weight_grad_kernel)[(K // MASK_COLUMNS, splits)](
        grad, x, bits, partial, M, K, R, 1.0 / (1.0 - p), rows_per_split, BLOCK_M=launch.block_rows, BLOCK_R=block_r,
        num_warps=launch.num_warps, num_stages=launch.num_stages)
    return partial


@triton_op("thuglm::dropout_linear", mutates_args=())
def dropout_linear(x: torch.Tensor, weight: torch.Tensor, seed: torch.Tensor,
                   p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`F.linear(F.dropout(x, p), weight)` for a contiguous [M, K] `x` (K a multiple of 64), the mask drawn from
    `seed` (a one-element int64 tensor on x's device); and that mask as [M, K // 32] int32 words (`kept_mask`)."""
    partial, bits = forward_partials(x, weight, seed, p)
    return partial.sum(dim=0)[:, :weight.shape[0]].to(x.dtype), bits


@triton_op("thuglm::dropout_linear_input_grad", mutates_args=())
def dropout_linear_input_grad(grad: torch.Tensor, weight: torch.Tensor, bits: torch.Tensor, p: float) -> torch.Tensor:
    return input_grad(grad, weight, bits, p)


@triton_op("thuglm::dropout_linear_weight_grad", mutates_args=())
def dropout_linear_weight_grad(grad: torch.Tensor, x: torch.Tensor, bits: torch.Tensor, p: float) -> torch.Tensor:
    return weight_grad_partials(grad, x, bits, p).sum(dim=0)[:grad.shape[1]]


def kept_mask(bits: torch.Tensor) -> torch.Tensor:
    """The [M, K] mask (True: kept) that `dropout_linear`'s words hold: for checking the kernels against the same
    mask applied by hand."""
    shifts = torch.arange(32, device=bits.device, dtype=torch.int32)
    return ((bits.unsqueeze(-1) >> shifts) & 1).bool().reshape(bits.shape[0], -1)


def _setup_context(ctx, inputs, output):
    x, weight, _, p = inputs
    ctx.save_for_backward(x, weight, output[1])
    ctx.p = p


def _backward(ctx, grad, _):
    x, weight, bits = ctx.saved_tensors
    grad = grad.contiguous()
    dx = dw = None
    if ctx.needs_input_grad[0]:
        dx = dropout_linear_input_grad(grad, weight, bits, ctx.p)
    if ctx.needs_input_grad[1]:
        dw = dropout_linear_weight_grad(grad, x, bits, ctx.p).to(weight.dtype)
    return dx, dw, None, None


dropout_linear.register_autograd(_backward, setup_context=_setup_context)


class DropoutLinear(torch.nn.Linear):
    """An adapter's `lora_A` that applies the dropout peft would apply before it, inside its product (training
    only). Its one parameter is `weight`, as the `nn.Linear` it replaces, so adapters save and load as before."""

    def __init__(self, linear: torch.nn.Linear, p: float):
        super().__init__(linear.in_features, linear.out_features, bias=False, device="meta")
        self.weight = linear.weight
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        if not self._fused_here(x):
            return super().forward(F.dropout(x, self.p, training=True))
        # Under autocast the product runs in the input's half precision, as autocast's linear would.
        weight = self.weight.to(x.dtype)
        seed = torch.randint(0, 2**62, (1,), device=x.device, dtype=torch.int64)
        flat = x.reshape(-1, x.shape[-1]).contiguous()
        return dropout_linear(flat, weight, seed, self.p)[0].reshape(*x.shape[:-1], self.out_features)

    def _fused_here(self, x: torch.Tensor) -> bool:
        return ((x.is_cuda or ON_CPU) and x.dtype in (torch.bfloat16, torch.float16)
                and x.shape[-1] % MASK_COLUMNS == 0)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, dropout={self.p} (fused)"


def fuse_lora_dropout(model: torch.nn.Module) -> int:
    """Give every LoRA layer's dropout to its `lora_A` (a `DropoutLinear`) and make peft's dropout an identity;
    return how many adapters changed. Adapters without dropout are left as they are."""
    fused = 0
    for module in model.modules():
        if not isinstance(module, LoraLayer):
            continue
        for adapter, dropout in module.lora_dropout.items():
            lora_a = module.lora_A[adapter]
            if isinstance(dropout, torch.nn.Dropout) and dropout.p > 0 and type(lora_a) is torch.nn.Linear:
                module.lora_A[adapter] = DropoutLinear(lora_a, dropout.p)
                module.lora_dropout[adapter] = torch.nn.Identity()
                fused += 1
    return fused
