"""Causal-LM loss straight from the last hidden states, without the [tokens, vocab] fp32 logits.

ChatGLM-6B's vocabulary has 130,528 tokens: at 4,096 tokens a step the usual path (bf16 logits, their fp32 copy,
log-softmax, its gradient) holds several GB for one scalar. `linear_cross_entropy` walks the tokens in chunks: each
chunk's logits are made, turned into the chunk's loss and its gradient (softmax - one-hot), multiplied back into the
gradients of the hidden states and of the output weight, and dropped. Memory is one chunk's logits; the arithmetic is
the plain path's (fp32 log-sum-exp, the same shift and ignore_index as transformers' `ForCausalLMLoss`).

The gradients are computed during the forward pass, as Liger-Kernel's fused linear cross-entropy does, so nothing
is recomputed in backward; backward only scales them by the incoming gradient (the loss is a scalar).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .compiling import compiled_or_eager

IGNORE_INDEX = -100
"""The label of a token no loss is taken on (a prompt, `[gMASK]`, `<sop>`, padding): transformers' and torch's
`ignore_index`. Every layout, collator and loss of thuglm imports this one."""
# One chunk's fp32 logits: a sixteenth of the whole batch's, within [16 MB, 256 MB]. At batch 1 x 512 tokens of a
# 130,528-token vocabulary that is 32 tokens (the logits, not the activations, would otherwise set the peak); large
# batches take 512 tokens a chunk; a small vocabulary takes 16 MB chunks (thousands of tokens).
CHUNK_BYTES = 256 * 2**20
MIN_CHUNK_BYTES = 16 * 2**20


def perplexity(loss: float) -> float:
    """exp(mean token loss), infinite instead of an OverflowError for a loss past what a float holds."""
    return math.exp(loss) if loss < 700 else float("inf")


def default_chunk_tokens(vocab_size: int, tokens: int) -> int:
    """Tokens a chunk: a power of two whose fp32 logits take about 1/16 of the batch's, within the bounds above."""
    row_bytes = 4 * vocab_size
    budget = min(CHUNK_BYTES, max(MIN_CHUNK_BYTES, tokens * row_bytes // 16))
    size = max(1, budget // row_bytes)
    return 1 << (size.bit_length() - 1)


def _token_losses(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """logits [n, vocab], target [n, 1] -> each token's loss, log-sum-exp minus the target's logit, in fp32."""
    logits = logits.float()
    shifted = logits - logits.amax(dim=-1, keepdim=True)
    return shifted.exp().sum(dim=-1).log() - shifted.gather(1, target).squeeze(1)


def _token_losses_and_logit_grads(
    logits: torch.Tensor, target: torch.Tensor, token_weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The losses of `_token_losses` and the gradient of the weighted loss by the logits, (softmax - one-hot) times
    each token's weight, in the logits' dtype (what the products back to the hidden states and weight take)."""
    dtype, logits = logits.dtype, logits.float()
    shifted = logits - logits.amax(dim=-1, keepdim=True)
    exp = shifted.exp()
    sum_exp = exp.sum(dim=-1, keepdim=True)
    losses = sum_exp.log().squeeze(1) - shifted.gather(1, target).squeeze(1)
    is_target = torch.arange(logits.shape[-1], device=logits.device) == target
    return losses, ((exp / sum_exp - is_target.to(exp.dtype)) * token_weights).to(dtype)


def _fused_on(device: torch.device, fn):
    """`fn` compiled into one or two fused kernels on a GPU (torch.compile); on other devices `fn` as written.

    Written out, each step over a chunk's [tokens, vocab] logits (the fp32 copy, the max, the shift, exp, the sum,
    the division, the one-hot, the weighting, the cast back) is a kernel reading and writing the whole buffer: on a
    large batch that memory traffic cost about as much as the loss's two products (benchmarks/README.md, #23). Fused,
    the logits are read for the row's max and sum and once more for the gradient. On a CPU the code runs as written
    (compiling would cost the tests and CPU users seconds for nothing). Where compiling fails, as written too, with a
    warning.
    """
    return compiled_or_eager(fn) if device.type == "cuda" else fn


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, normalizer, chunk_tokens):
        # hidden [N, H]; weight [V, H]; targets [N] with IGNORE_INDEX where no loss is taken; normalizer: scalar.
        need_hidden_grad, need_weight_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_hidden_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight_grad else None
        # What depends on the tokens only is made once, not per chunk: at batch 1 a step has 16 chunks, and each
        # operation is a kernel launch the GPU waits for (the step is host-bound there).
        valid = targets != IGNORE_INDEX
        safe_targets = targets.masked_fill(~valid, 0)[:, None]
        token_weights = (valid / normalizer)[:, None]  # d(mean loss)/d(token loss): 1/normalizer, 0 where ignored
        token_losses = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        losses_only = _fused_on(hidden.device, _token_losses)
        losses_and_grads = _fused_on(hidden.device, _token_losses_and_logit_grads)
        for start in range(0, hidden.shape[0], chunk_tokens):
            end = min(start + chunk_tokens, hidden.shape[0])
            chunk, target = hidden[start:end], safe_targets[start:end]
            logits = chunk @ weight.T
            if grad_hidden is None and grad_weight is None:
                token_losses[start:end] = losses_only(logits, target)
                continue
            token_losses[start:end], grad_logits = losses_and_grads(logits, target, token_weights[start:end])
            if grad_hidden is not None and grad_logits.dtype == weight.dtype == grad_hidden.dtype:
                torch.mm(grad_logits, weight, out=grad_hidden[start:end])
            elif grad_hidden is not None:  # under autocast (fp32 hidden states, a bf16 weight): autocast's product
                grad_hidden[start:end] = grad_logits @ weight
            if grad_weight is not None:
                grad_weight += (grad_logits.T @ chunk).float()
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype) if grad_weight is not None else None)
        return torch.where(valid, token_losses, 0.0).sum() / normalizer

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        grad_hidden = grad_hidden * grad_output.to(grad_hidden.dtype) if grad_hidden is not None else None
        grad_weight = grad_weight * grad_output.to(grad_weight.dtype) if grad_weight is not None else None
        return grad_hidden, grad_weight, None, None, None


def linear_cross_entropy(
    hidden_states: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    num_items_in_batch: int | torch.Tensor | None = None,
    chunk_tokens: int | None = None,
) -> torch.Tensor:
    """Causal-LM loss of `hidden_states @ weight.T` against `labels`, equal to transformers' `ForCausalLMLoss`.

    hidden_states [batch, seq, hidden]; weight [vocab, hidden] (the lm_head); labels [batch, seq], IGNORE_INDEX where
    no loss is taken, shifted here (token t predicts t + 1). The mean over the counted tokens, or their sum divided by
    `num_items_in_batch` when given (the Trainer's gradient-accumulation normalisation).
    """
    # Shift the labels, not the hidden states: the last position predicts nothing, and no copy is made.
    targets = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].reshape(-1).to(hidden_states.device)
    hidden = hidden_states.reshape(-1, hidden_states.shape[-1])
    if num_items_in_batch is None:
        normalizer = (targets != IGNORE_INDEX).sum().clamp(min=1).float()
    else:
        normalizer = torch.as_tensor(num_items_in_batch, device=hidden.device).float()
    chunk_tokens = chunk_tokens or default_chunk_tokens(weight.shape[0], hidden.shape[0])
    return _LinearCrossEntropy.apply(hidden, weight, targets, normalizer, chunk_tokens)
