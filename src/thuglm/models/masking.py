"""GLM's 2D positions and prefix-LM attention mask, for plain, left-padded and packed batches.

ChatGLM-6B reads a sample as `context [gMASK] <sop> generated...`:

* every token before `<sop>` (the context) sees the whole context, both ways;
* `<sop>` and every token after it see the context and the generated tokens before them (causal);
* position ids are two rows: the position (0, 1, ... in the context, then frozen at the index of `[gMASK]`) and the
  block position (0 in the context, then 1, 2, ... from `<sop>` on).

The block position is therefore 0 exactly on the context tokens, so the mask follows from the position ids. A row
may hold several samples ("packing"): a 2D `attention_mask` of segment numbers (1, 2, 3, ...; 0 for padding) keeps
each sample's positions and mask exactly as if it were alone, with no attention across samples. A 0/1 mask is the
ordinary padding mask: one sample a row.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class MissingGlmTokensError(ValueError):
    """A sample has no `<sop>` or no `[gMASK]`/`[MASK]`, so GLM positions cannot be derived from it."""


def _segment_ids(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    if attention_mask is None:
        return torch.ones_like(input_ids)
    if attention_mask.dim() != 2:
        raise ValueError(f"expected a 2D attention_mask [batch, seq], got shape {tuple(attention_mask.shape)}")
    return attention_mask.to(device=input_ids.device, dtype=torch.long)


def glm_position_ids(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    bos_token_id: int,
    mask_token_id: int,
    gmask_token_id: int,
    strict: bool = False,
) -> torch.Tensor:
    """Position ids [batch, 2, seq] of every sample in `input_ids` [batch, seq], as the official code derives them.

    Within each sample (a run of equal non-zero `attention_mask` values; the whole row when the mask is None), the
    context is everything before its first `<sop>` (the whole sample if it has none) and positions after the context
    freeze at its first `[gMASK]`, or first `[MASK]` if it has no `[gMASK]`. Padding gets position 0.
    With `strict`, a sample lacking `<sop>` or a mask token raises `MissingGlmTokensError` instead.
    """
    batch, seq = input_ids.shape
    device = input_ids.device
    segments = _segment_ids(input_ids, attention_mask)
    index = torch.arange(seq, device=device).expand(batch, seq)

    # Give every sample of every row its own group number, then reduce per group with scatter_reduce.
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    group = starts.long().cumsum(1) - 1 + torch.arange(batch, device=device)[:, None] * seq
    start_index = torch.where(starts, index, torch.zeros_like(index)).cummax(1).values
    local = index - start_index

    groups = batch * seq
    absent = seq + 1  # larger than any local index

    def first_local(token_id: int) -> torch.Tensor:
        # Every position takes part (absent where the token is not): a boolean index would read its count back
        # from the GPU, one host-device synchronisation per call in every forward.
        candidates = torch.where(input_ids == token_id, local, absent)
        first = torch.full((groups,), absent, dtype=torch.long, device=device)
        first.scatter_reduce_(0, group.flatten(), candidates.flatten(), reduce="amin")
        return first[group]

    length = torch.zeros(groups, dtype=torch.long, device=device)
    length.scatter_reduce_(0, group.flatten(), local.flatten() + 1, reduce="amax")
    length = length[group]

    first_sop = first_local(bos_token_id)
    first_gmask = first_local(gmask_token_id)
    mask_position = torch.where(first_gmask < absent, first_gmask, first_local(mask_token_id))
    if strict:
        _check_glm_tokens(segments, first_sop, mask_position, absent)

    context_length = torch.where(first_sop < absent, first_sop, length)
    in_context = local < context_length
    frozen = torch.where(mask_position < absent, mask_position, local)
    position = torch.where(in_context, local, frozen)
    block_position = torch.where(in_context, torch.zeros_like(local), local - context_length + 1)
    padding = segments == 0
    position = position.masked_fill(padding, 0)
    block_position = block_position.masked_fill(padding, 0)
    return torch.stack([position, block_position], dim=1)


def _check_glm_tokens(segments, first_sop, mask_position, absent) -> None:
    real = segments != 0
    if not ((first_sop >= absent) | (mask_position >= absent)).logical_and(real).any():  # one read-back, then done
        return
    for what, missing in (("<sop>", first_sop >= absent), ("[gMASK] (or [MASK])", mask_position >= absent)):
        bad = (missing & real).any(dim=1).nonzero().flatten().tolist()
        if bad:
            raise MissingGlmTokensError(
                f"row {bad[0]} of the batch has no {what} token, so ChatGLM cannot tell its context from its "
                "continuation. Encode each sample as `text [gMASK] <sop>` (what tokenizer(text) returns with "
                "add_special_tokens=True; for training samples `[gMASK] <sop> text <eop>`), or pass position_ids "
                "[batch, 2, seq] yourself."
            )


def glm_mask_rule(
    position_ids: torch.Tensor, attention_mask: torch.Tensor | None, past_length: int
) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """GLM's attention rule as a FlexAttention-style `mask_mod(batch, head, query, key) -> allowed`.

    Query q (absolute index past_length + q) sees key k when both belong to the same sample and k <= q or key k is
    in its sample's context (block position 0). Past keys always come before the current queries, so only the
    current chunk's block positions are needed; `attention_mask` is the 2D mask over all past_length + q_len keys.
    A padding query sees only itself: a softmax over nothing is NaN (the dtype minimum becomes -inf once autocast
    runs attention in fp16), and its gradient would poison the batch though no loss is taken there.
    """
    batch, _, q_len = position_ids.shape
    device = position_ids.device
    k_len = past_length + q_len
    if attention_mask is None:
        segments = torch.ones(batch, k_len, dtype=torch.long, device=device)
    else:
        segments = attention_mask.to(device=device, dtype=torch.long)
        if segments.shape[-1] != k_len:
            raise ValueError(f"attention_mask covers {segments.shape[-1]} tokens but past + current tokens are {k_len}")
    in_context = torch.zeros(batch, k_len, dtype=torch.bool, device=device)
    in_context[:, past_length:] = position_ids[:, 1] == 0

    def mask_mod(b, h, q, k):
        q = q + past_length
        same_sample = (segments[b, q] == segments[b, k]) & (segments[b, k] != 0)
        padding_self = (segments[b, q] == 0) & (k == q)
        return (same_sample & ((k <= q) | in_context[b, k])) | padding_self

    return mask_mod


def glm_attention_mask(
    position_ids: torch.Tensor, attention_mask: torch.Tensor | None, past_length: int, dtype: torch.dtype
) -> torch.Tensor:
    """`glm_mask_rule` as an additive mask [batch, 1, q_len, past_length + q_len] (eager and sdpa attention)."""
    batch, _, q_len = position_ids.shape
    device = position_ids.device
    rule = glm_mask_rule(position_ids, attention_mask, past_length)
    b = torch.arange(batch, device=device)[:, None, None, None]
    q = torch.arange(q_len, device=device)[None, None, :, None]
    k = torch.arange(past_length + q_len, device=device)[None, None, None, :]
    allowed = rule(b, 0, q, k)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)


def glm_decode_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`glm_attention_mask` for one new token (the last of the 2D `attention_mask`), in a handful of kernels.

    A decoded token comes after its sample's context, so it sees every earlier token of its sample: the rule
    reduces to "same sample" (a padding query sees only itself), and no position ids are needed.
    """
    segments = attention_mask.long()
    query = segments[:, -1:]
    allowed = (segments == query) & (segments != 0)
    allowed[:, -1] = True  # the token itself, also when it is padding
    mask = torch.zeros(allowed.shape, dtype=dtype, device=attention_mask.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None, None, :]


def glm_static_cache_mask(
    position_ids: torch.Tensor, attention_mask: torch.Tensor | None, cache_length: int, dtype: torch.dtype
) -> torch.Tensor:
    """GLM's additive mask [batch, 1, q_len, cache_length] for a preallocated (static) KV cache.

    `attention_mask` is the 2D mask over the past and current tokens (its length tells the past length without
    reading the cache, so no device sync); cache slots after them are not written yet and are masked out.
    """
    batch, _, q_len = position_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones(batch, q_len, dtype=torch.long, device=position_ids.device)
    past_length = attention_mask.shape[-1] - q_len
    if q_len == 1:
        mask = glm_decode_mask(attention_mask, dtype)
    else:
        mask = glm_attention_mask(position_ids, attention_mask, past_length, dtype)
    if mask.shape[-1] > cache_length:
        raise ValueError(f"{mask.shape[-1]} tokens do not fit a static cache of {cache_length}")
    return torch.nn.functional.pad(mask, (0, cache_length - mask.shape[-1]), value=torch.finfo(dtype).min)


def glm_block_mask(
    position_ids: torch.Tensor, attention_mask: torch.Tensor | None, past_length: int, prefix_length: int = 0
):
    """`glm_mask_rule` as a FlexAttention BlockMask: blocks that no query sees are skipped, not computed.

    With `prefix_length` (P-Tuning), the keys are [prefix | text]: every query sees every prefix slot.
    """
    from torch.nn.attention.flex_attention import create_block_mask

    batch, _, q_len = position_ids.shape
    rule = glm_mask_rule(position_ids, attention_mask, past_length)
    if prefix_length:
        text_rule = rule

        def rule(b, h, q, k):
            return (k < prefix_length) | text_rule(b, h, q, (k - prefix_length).clamp(min=0))

    kv_len = prefix_length + past_length + q_len
    return create_block_mask(rule, batch, None, q_len, kv_len, device=position_ids.device)
