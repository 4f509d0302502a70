"""Continuous batching for `thuglm serve`: one thread owns the model and decodes every active request together.

Requests join and leave the batch at step boundaries. Each request holds one *slot*: a row of a KV cache allocated
once at start-up ([slots, heads, capacity, head_dim] keys and values per layer, `SlotCache`), so no memory is
allocated per request and a request's keys never move. A step of the scheduler

1. admits waiting requests into free slots: each prompt is prefilled alone (batch 1, its keys written into its
   slot) and its first token is sampled from the prefill's logits, which is what makes time to first token short;
2. decodes one token for every active slot in one forward pass: row i's token is written at its own length in its
   own row, and an additive mask lets it see only its own row's keys up to there;
3. hands each row's new token to its request (`deliver`, which must not block) and frees the slots of requests that
   finished, hit their token limit, or were cancelled (a closed connection, a stop string).

GLM's positions are per row: a prompt laid out as `context [gMASK] <sop>` freezes the position at the `[gMASK]` index
and counts the block position from `<sop>` on (`masking.py`), so a decoded token needs only its row's `[gMASK]`
index and its count of generated tokens. A decoded token comes after its context and sees every earlier token of
its sample, so the decode mask is "this row's keys up to its length" and nothing else.

Under greedy decoding every request's tokens are those it gets decoded alone (`tests/inference/test_serve_batching.py`):
rows never see each other, and the arithmetic differs only by the batch size of the matrix products.

By default the decode step runs eagerly in shapes that follow the load: rows up to the last active slot, keys up to
the longest row (rounded up to `SPAN_BUCKET`). With `static_decode` it runs in fixed shapes (every slot, the whole
cache), which on CUDA is captured once as a CUDA graph and replayed (`StaticDecodeStep`).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import TemperatureLogitsWarper, TopPLogitsWarper

from ..errors import ThuglmError

logger = logging.getLogger("thuglm.serve")

# The attended key span of a decode step is the longest active row rounded up to a multiple of this: a few shapes
# only, and at most this many masked keys of waste a row.
SPAN_BUCKET = 64


class QueueFullError(RuntimeError):
    """More requests are waiting for a slot than the server accepts (answered 429)."""


class PromptTooLongError(ValueError):
    """A prompt that leaves no room in a slot for even one answer token (answered 400)."""


class CacheTooLargeError(ThuglmError, ValueError):
    """The slots' KV cache does not fit the GPU's free memory; the message gives settings that do."""


SLOT_TOKENS_STEP = 256  # a --max-seq-len proposed in an error is a multiple of this


def check_cache_fits(slots: int, capacity: int, bytes_a_token: int, free_bytes: int) -> None:
    """Refuse `slots` rows of `capacity` tokens (`bytes_a_token` of keys and values over all layers) that need more
    than `free_bytes`, naming the most slots that fit at this length and the longest slots that fit this many."""
    needed = slots * capacity * bytes_a_token
    if needed <= free_bytes:
        return
    fitting_slots = free_bytes // (capacity * bytes_a_token)
    fitting_length = free_bytes // (slots * bytes_a_token) // SLOT_TOKENS_STEP * SLOT_TOKENS_STEP
    fixes = [f"--max-batch {fitting_slots}" if fitting_slots else None,
             f"--max-seq-len {fitting_length} (tokens a slot)" if fitting_length else None]
    fixes = [fix for fix in fixes if fix]
    raise CacheTooLargeError(
        f"{slots} slots of {capacity:,} tokens need {needed / 2**30:.1f} GiB of KV cache, and this GPU has "
        f"{free_bytes / 2**30:.1f} GiB free after the model: "
        + (f"pass {' or '.join(fixes)}" if fixes else "use a GPU with more memory")
    )


@dataclass
class Sampling:
    """How one request picks its tokens: greedy when `temperature` is 0, else temperature and nucleus sampling."""

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class GenerationRequest:
    """One prompt in the scheduler: its token ids, how to sample, and where its tokens go.

    `deliver(token_ids, finish_reason)` is called from the scheduler thread with each step's new ids (an empty list
    with the reason when it ends: "stop" for the end token, "length" for the token limit, "cancelled", or "error: ...").
    It must return at once: a slow consumer must not hold up the batch.
    """

    prompt_ids: list[int]
    mask_position: int  # the prompt's [gMASK] index: every generated token's position (the block position counts)
    sampling: Sampling
    deliver: Callable[[list[int], str | None], None]
    cancelled: threading.Event = field(default_factory=threading.Event)
    generated: int = 0
    submitted_at: float = field(default_factory=time.monotonic)

    def cancel(self) -> None:
        """Ask the scheduler to stop this request and free its slot at the next step boundary."""
        self.cancelled.set()


class SlotCache:
    """A KV cache with one fixed row per request; the model calls `update` from every attention layer.

    Before each forward the scheduler says where the new keys go: `prefill(slot)` writes a whole prompt into one row
    and returns just those keys (a prompt attends only to itself); `decode(lengths)` writes each row's one new key
    at that row's length and returns rows 0..n-1 up to `span` keys, which the decode mask cuts per row.
    """

    is_compileable = False  # the model builds no mask of its own for it: the scheduler passes a ready 4D mask

    def __init__(self, num_layers: int, slots: int, num_heads: int, capacity: int, head_dim: int, dtype, device):
        shape = (slots, num_heads, capacity, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.capacity = capacity
        self._slot: int | None = None
        self._lengths: torch.Tensor | None = None
        self._span = 0

    def prefill(self, slot: int) -> None:
        self._slot, self._lengths = slot, None

    def decode(self, lengths: torch.Tensor, span: int) -> None:
        self._slot, self._lengths, self._span = None, lengths, span

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        if self._lengths is None:
            length = key.shape[2]
            keys[self._slot, :, :length] = key[0]
            values[self._slot, :, :length] = value[0]
            return key, value
        rows = torch.arange(key.shape[0], device=key.device)
        keys[rows, :, self._lengths] = key[:, :, 0]
        values[rows, :, self._lengths] = value[:, :, 0]
        return keys[: key.shape[0], :, : self._span], values[: key.shape[0], :, : self._span]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        raise NotImplementedError("SlotCache rows have lengths of their own; the scheduler passes masks and positions")


@dataclass
class _Slot:
    request: GenerationRequest
    length: int  # tokens in the cache: where the next decoded token's key goes
    next_token: int  # sampled, not yet fed to the model
    generator: torch.Generator | None


def _language_model(model):
    """The ChatGLM under a peft wrapper (its config and embedding), or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decode_logits(model, cache: SlotCache, input_ids: torch.Tensor, position_ids: torch.Tensor,
                  lengths: torch.Tensor, span: int, dtype: torch.dtype) -> torch.Tensor:
    """Next-token logits [rows, vocab] of one decoded token a row; row i's token goes to cache position lengths[i].

    A decoded token comes after its context, so it sees exactly its row's keys up to and including its own.
    """
    visible = torch.arange(span, device=lengths.device)[None, :] <= lengths[:, None]
    mask = torch.zeros(visible.shape, dtype=dtype, device=lengths.device)
    mask = mask.masked_fill_(~visible, torch.finfo(dtype).min)[:, None, None, :]
    cache.decode(lengths, span)
    return model(input_ids=input_ids, position_ids=position_ids, attention_mask=mask, past_key_values=cache,
                 use_cache=True).logits[:, -1]


class StaticDecodeStep:
    """The decode step in fixed shapes: every slot a row, the whole cache as the span, inputs in fixed buffers.

    Fixed shapes and addresses let CUDA capture the step once as a graph (`capture`) and replay it for every later
    step, one launch instead of the step's hundreds of kernel launches, each of which costs host time. The price is
    computing free slots' rows and attending over the whole capacity. Without `capture` (on a CPU) the same forward
    runs eagerly, which is how the tests check that these shapes give the tokens of the variable-shape step.
    """

    def __init__(self, model, cache: SlotCache, slots: int, dtype: torch.dtype, device: torch.device):
        self.model, self.cache, self.dtype = model, cache, dtype
        self.input_ids = torch.zeros(slots, 1, dtype=torch.long, device=device)
        self.position_ids = torch.zeros(slots, 2, 1, dtype=torch.long, device=device)
        self.lengths = torch.zeros(slots, dtype=torch.long, device=device)
        self.graph = None
        self.logits: torch.Tensor | None = None

    @torch.no_grad()
    def _forward(self) -> torch.Tensor:
        return decode_logits(self.model, self.cache, self.input_ids, self.position_ids, self.lengths,
                             self.cache.capacity, self.dtype)

    @torch.no_grad()
    def capture(self) -> None:
        """Record the step as a CUDA graph, while every slot is free (the warm-up runs write only their position 0)."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the capture, as torch.cuda.graphs asks
            for _ in range(3):
                self._forward()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._forward()

    def __call__(self, input_ids: torch.Tensor, position_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        rows = input_ids.shape[0]
        self.input_ids.zero_()
        self.position_ids.zero_()
        self.lengths.zero_()  # free slots decode a dummy token at their position 0
        self.input_ids[:rows].copy_(input_ids)
        self.position_ids[:rows].copy_(position_ids)
        self.lengths[:rows].copy_(lengths)
        if self.graph is None:
            return self._forward()[:rows]
        self.graph.replay()
        return self.logits[:rows]


class ContinuousBatcher:
    """The scheduler thread. `submit` from any thread; `start` once; `stop` cancels what is left and joins.

    `static_decode`: decode with `StaticDecodeStep`, captured as a CUDA graph when the model is on a CUDA device
    (at `start`, before the first request is admitted).
    """

    def __init__(self, model, end_token_ids: int | list[int], slots: int = 16, capacity: int | None = None,
                 max_queued: int = 64, static_decode: bool = False):
        base = _language_model(model)
        config = base.config
        self.model = model
        self.device = base.get_input_embeddings().weight.device
        self.dtype = base.get_input_embeddings().weight.dtype
        if not self.dtype.is_floating_point:  # a quantized embedding: the cache holds the compute dtype
            probe = getattr(base.get_input_embeddings(), "dtype_probe", None)  # int4-qe: the dtype its rows come in
            self.dtype = probe.dtype if probe is not None else torch.get_default_dtype()
        self.capacity = capacity or config.max_sequence_length
        self.end_ids = {end_token_ids} if isinstance(end_token_ids, int) else set(end_token_ids)
        if self.device.type == "cuda":  # a clear refusal instead of an out-of-memory error at start-up
            bytes_a_token = 2 * config.num_layers * config.hidden_size * self.dtype.itemsize  # keys and values
            check_cache_fits(slots, self.capacity, bytes_a_token, torch.cuda.mem_get_info(self.device)[0])
        self.cache = SlotCache(config.num_layers, slots, config.num_attention_heads, self.capacity,
                               config.hidden_size // config.num_attention_heads, self.dtype, self.device)
        self.slots: list[_Slot | None] = [None] * slots
        self.max_queued = max_queued
        self.waiting: collections.deque[GenerationRequest] = collections.deque()
        self.wakeup = threading.Condition()
        self.running = False
        self.thread: threading.Thread | None = None
        self.static_step = StaticDecodeStep(model, self.cache, slots, self.dtype, self.device) if static_decode else None

    # ---- the public side ---------------------------------------------------------------------------------------
    def submit(self, request: GenerationRequest) -> None:
        if len(request.prompt_ids) >= self.capacity:
            raise PromptTooLongError(
                f"the prompt is {len(request.prompt_ids)} tokens; a slot holds {self.capacity} tokens of prompt and "
                "answer together. Shorten the conversation (drop early turns) or start the server with a larger "
                "--max-seq-len."
            )
        with self.wakeup:
            waiting = sum(not waiting.cancelled.is_set() for waiting in self.waiting)  # a client gone counts no more
            if waiting >= self.max_queued:
                raise QueueFullError(
                    f"{waiting} requests are already waiting for one of {len(self.slots)} slots; retry later "
                    "(the server's --max-queued sets this bound)"
                )
            self.waiting.append(request)
            self.wakeup.notify()

    def start(self) -> None:
        self.running = True
        self.thread = threading.Thread(target=self._run, name="thuglm-batcher", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        """Cancel every request still waiting or decoding and end the thread."""
        with self.wakeup:
            self.running = False
            self.wakeup.notify()
        if self.thread is not None:
            self.thread.join()
        for request in [*self.waiting, *(slot.request for slot in self.slots if slot is not None)]:
            request.deliver([], "cancelled")
        self.waiting.clear()
        self.slots = [None] * len(self.slots)

    @property
    def active(self) -> int:
        return sum(slot is not None for slot in self.slots)

    # ---- the scheduler thread ----------------------------------------------------------------------------------
    def _run(self) -> None:
        if self.static_step is not None and self.device.type == "cuda":
            started = time.perf_counter()
            try:
                self.static_step.capture()
                logger.info("decode step captured as a CUDA graph (%d slots of %d tokens) in %.1fs", len(self.slots),
                            self.capacity, time.perf_counter() - started)
            except Exception:  # the server still serves, with the variable-shape eager step
                logger.exception("capturing the decode step as a CUDA graph failed; decoding eagerly instead")
                self.static_step = None
        while True:
            with self.wakeup:
                while self.running and not self.waiting and not self.active:
                    self.wakeup.wait()
                if not self.running:
                    return
            try:
                self._admit()
                if self.active:
                    self._decode_step()
            except Exception as error:  # a failed step (out of memory, a bug) ends its requests, not the server
                logger.exception("a batch step failed; its requests end with an error")
                for index, slot in enumerate(self.slots):
                    if slot is not None:
                        slot.request.deliver([], f"error: {type(error).__name__}: {error}")
                        self.slots[index] = None

    def _admit(self) -> None:
        while None in self.slots:
            with self.wakeup:
                if not self.waiting:
                    return
                request = self.waiting.popleft()
            if request.cancelled.is_set():
                request.deliver([], "cancelled")
                continue
            index = self.slots.index(None)
            try:
                self._prefill(index, request)
            except Exception as error:
                logger.exception("prefill failed")
                request.deliver([], f"error: {type(error).__name__}: {error}")
                self.slots[index] = None

    @torch.no_grad()
    def _prefill(self, index: int, request: GenerationRequest) -> None:
        from ..models.masking import glm_attention_mask, glm_position_ids

        base = _language_model(self.model)
        input_ids = torch.tensor([request.prompt_ids], device=self.device)
        config = base.config
        position_ids = glm_position_ids(input_ids, None, config.bos_token_id, config.mask_token_id,
                                        config.gmask_token_id, strict=True)
        mask = glm_attention_mask(position_ids, None, 0, self.dtype)
        self.cache.prefill(index)
        logits = self.model(input_ids=input_ids, position_ids=position_ids, attention_mask=mask,
                            past_key_values=self.cache, use_cache=True, logits_to_keep=1).logits[:, -1]
        sampling = request.sampling
        generator = None
        if not sampling.greedy:
            generator = torch.Generator(self.device)
            if sampling.seed is None:
                generator.seed()
            else:
                generator.manual_seed(sampling.seed)
        slot = _Slot(request, len(request.prompt_ids), 0, generator)
        self.slots[index] = slot
        token = self._pick([slot], logits)[0]
        self._hand_over(index, token)

    @torch.no_grad()
    def _decode_step(self) -> None:
        rows = max(i for i, slot in enumerate(self.slots) if slot is not None) + 1
        # A free slot below the last active one decodes a dummy token at its position 0 (overwritten by the next
        # prefill there): fixed rows keep every request's keys where they are.
        live = [self.slots[i] for i in range(rows)]
        tokens = [slot.next_token if slot else 0 for slot in live]
        lengths_list = [slot.length if slot else 0 for slot in live]
        # A generated token keeps the [gMASK] position; its block position is 1 for <sop>, then 2, 3, ...
        positions = [[slot.request.mask_position if slot else 0] for slot in live]
        blocks = [[slot.request.generated + 1 if slot else 0] for slot in live]
        device = self.device
        lengths = torch.tensor(lengths_list, device=device)
        input_ids = torch.tensor(tokens, device=device)[:, None]
        position_ids = torch.tensor([positions, blocks], device=device).permute(1, 0, 2)  # [rows, 2, 1]
        if self.static_step is not None:
            logits = self.static_step(input_ids, position_ids, lengths)
        else:
            span = min(self.capacity, -(-(max(lengths_list) + 1) // SPAN_BUCKET) * SPAN_BUCKET)
            logits = decode_logits(self.model, self.cache, input_ids, position_ids, lengths, span, self.dtype)
        active = [i for i, slot in enumerate(live) if slot is not None]
        for slot in live:
            if slot is not None:
                slot.length += 1
        picked = self._pick([live[i] for i in active], logits[active])
        for index, token in zip(active, picked):
            self._hand_over(index, token)

    def _pick(self, slots: list[_Slot], logits: torch.Tensor) -> list[int]:
        """Each row's next token: argmax for greedy rows, temperature + top-p sampling with the row's generator."""
        scores = logits.float()
        # The official chat's fp16 overflow guard (InvalidScoreLogitsProcessor), decided per row, so that one row's
        # overflow never changes another request's answer.
        overflowed = ~torch.isfinite(scores).all(dim=-1, keepdim=True)
        fallback = torch.zeros_like(scores[:1])
        fallback[..., 5] = 5e4
        scores = torch.where(overflowed, fallback, scores)
        chosen = scores.argmax(dim=-1)
        for row, slot in enumerate(slots):
            sampling = slot.request.sampling
            if sampling.greedy:
                continue
            row_scores = TemperatureLogitsWarper(sampling.temperature)(None, scores[row : row + 1])
            row_scores = TopPLogitsWarper(sampling.top_p)(None, row_scores)
            probs = torch.softmax(row_scores, dim=-1)
            chosen[row] = torch.multinomial(probs, 1, generator=slot.generator)[0, 0]
        return chosen.tolist()  # the step's one wait for the device

    def _hand_over(self, index: int, token: int) -> None:
        """Give `token` to its request, or end the request and free its slot."""
        slot = self.slots[index]
        request = slot.request
        if request.cancelled.is_set():
            request.deliver([], "cancelled")
        elif token in self.end_ids:
            request.deliver([], "stop")
        else:
            request.generated += 1
            slot.next_token = token
            full = slot.length >= self.capacity  # no room to feed it back
            if request.generated >= request.sampling.max_new_tokens or full:
                request.deliver([token], "length")
            else:
                request.deliver([token], None)
                return
        self.slots[index] = None
