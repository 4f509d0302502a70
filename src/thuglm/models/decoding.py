"""A decoding loop for `generate` that never makes the host wait for the GPU between tokens.

transformers' sampling loop (`GenerationMixin._sample`) asks after every token whether every row has finished,
`bool(unfinished_sequences.max() == 0)`. On CUDA that read waits until the GPU has finished the step, so the host's
own work for the next step (preparing inputs, GLM's decode mask, the logits processors, the compiled step's guards
and graph replay) runs while the GPU idles: at batch 1 a token's wall time is well above its GPU time (measured in
benchmarks/README.md, "Greedy decoding").

This loop reads that flag one step late: each step's flag is copied to pinned host memory without blocking, and
the host reads the previous step's flag only after queueing the current step. When the late flag says every row
had already finished, the current step was one too many; its token column is dropped (for rows that had finished
it is the pad token), so the tokens returned are exactly `_sample`'s. The cost is one surplus forward at the end.
transformers has the same idea (`DeferredStopCheck`) but switches it on for Apple's MPS only.

It is handed to `generate(custom_generate=sample_without_host_sync)`, transformers' hook for a decoding loop of
one's own, after generate has prepared the cache, the logits processors and the stopping criteria. Whatever needs
the host in step with the GPU, or the cache back in the state `_sample` leaves it, goes to `_sample` unchanged:
`return_dict_in_generate`, assisted decoding, and a cache the caller passed in. generate gives a custom loop no
streamer and no `synced_gpus`, so `fast_decoding_kwargs` does not choose this loop for streaming or for several
processes generating together.
"""

from __future__ import annotations

import torch
from transformers import GenerationConfig, GenerationMixin, LogitsProcessorList, StoppingCriteriaList

CACHE_KEYS = ("past_key_values", "cache")  # transformers 5.2x calls it `cache`


class _LateFlag:
    """The previous step's "every row finished" flag, read one step late (pinned copy + event on CUDA)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.pending: torch.Tensor | None = None
        if self.cuda:
            # Two slots: the slot written for step t+1 was read (for step t-1) before it is written again.
            self.slots = [torch.zeros((), dtype=torch.bool, pin_memory=True) for _ in range(2)]
            self.events = [torch.cuda.Event() for _ in range(2)]
            self.slot = 0
            self.event: torch.cuda.Event | None = None

    def record(self, finished: torch.Tensor) -> None:
        if not self.cuda:
            self.pending = finished
            return
        slot = self.slots[self.slot]
        slot.copy_(finished, non_blocking=True)
        self.event = self.events[self.slot]
        self.event.record()
        self.pending = slot
        self.slot ^= 1

    def read(self) -> bool:
        """The flag recorded last, or False before the first record."""
        if self.pending is None:
            return False
        if self.cuda:
            self.event.synchronize()
        return bool(self.pending)


def needs_plain_sampling(model_kwargs: dict, generation_config: GenerationConfig, synced_gpus: bool, streamer) -> bool:
    """Whether `_sample` must run instead (see the module's docstring)."""
    user_cache = any(getattr(model_kwargs.get(key), "_is_user_defined", False) for key in CACHE_KEYS)
    return bool(
        streamer is not None
        or synced_gpus
        or generation_config.return_dict_in_generate
        or getattr(generation_config, "is_assistant", False)
        or user_cache
    )


def sample_without_host_sync(
    model: GenerationMixin,
    input_ids: torch.LongTensor,
    logits_processor: LogitsProcessorList,
    stopping_criteria: StoppingCriteriaList,
    generation_config: GenerationConfig,
    synced_gpus: bool = False,
    streamer=None,
    **model_kwargs,
) -> torch.LongTensor:
    """Greedy or multinomial sampling, as `GenerationMixin._sample`, with the stop check one step late.

    The arguments are `_sample`'s (generate passes them); returns the token ids, prompt included.
    """
    if needs_plain_sampling(model_kwargs, generation_config, synced_gpus, streamer):
        return GenerationMixin._sample(
            model, input_ids, logits_processor=logits_processor, stopping_criteria=stopping_criteria,
            generation_config=generation_config, synced_gpus=synced_gpus, streamer=streamer, **model_kwargs,
        )
    pad_token_id = generation_config._pad_token_tensor
    if pad_token_id is not None:
        pad_token_id = pad_token_id.to(input_ids.device)
    has_eos_stopping_criteria = any(hasattr(criteria, "eos_token_id") for criteria in stopping_criteria)
    max_length = stopping_criteria.max_length
    unfinished_sequences = torch.ones(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
    model_forward = (
        model.get_compiled_call(generation_config.compile_config)
        if model._valid_auto_compile_criteria(model_kwargs, generation_config)
        else model.__call__
    )
    all_finished_before = _LateFlag(input_ids.device)

    outputs = model._prefill(input_ids, generation_config, model_kwargs)
    while True:
        model_kwargs = model._update_model_kwargs_for_generation(
            outputs, model_kwargs, is_encoder_decoder=model.config.is_encoder_decoder
        )
        # A copy: a view would keep the prefill's logits (the whole prompt's) alive.
        next_token_logits = outputs.logits[:, -1].to(copy=True, dtype=torch.float32, device=input_ids.device)
        del outputs
        next_token_scores = logits_processor(input_ids, next_token_logits)
        if generation_config.do_sample:
            probs = torch.nn.functional.softmax(next_token_scores, dim=-1)
            next_tokens = torch.multinomial(probs, num_samples=1).squeeze(1)
        else:
            next_tokens = torch.argmax(next_token_scores, dim=-1)
        if has_eos_stopping_criteria:
            next_tokens = next_tokens * unfinished_sequences + pad_token_id * (1 - unfinished_sequences)
        input_ids = torch.cat([input_ids, next_tokens[:, None]], dim=-1)
        unfinished_sequences = unfinished_sequences & ~stopping_criteria(input_ids, None)

        # This step is queued; only now wait for the previous one's flag.
        if all_finished_before.read():
            return input_ids[:, :-1]  # every row had finished: this step's token is surplus
        if max_length is not None and input_ids.shape[1] >= max_length:
            return input_ids
        all_finished_before.record(unfinished_sequences.max() == 0)

        model_inputs = model.prepare_inputs_for_generation(
            input_ids, next_sequence_length=1 if model_kwargs["use_cache"] else None, **model_kwargs
        )
        outputs = model_forward(**model_inputs, return_dict=True)
