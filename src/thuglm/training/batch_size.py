"""`batch_size: auto`: the largest batch each process trains at, found by trying it; gradient accumulation keeps
`global_batch_size`.

On a GPU each candidate — the divisors of the rows one process takes a step, largest first — runs one forward and
backward pass over copies of the longest training row (packed rows are all that long), as the run's steps will
(precision, gradient checkpointing, the method's trainable weights). A candidate fits when the pass does not run out
of memory and its peak, plus the optimizer state still to come and a margin for the allocator, stays under the card's
memory. Under several processes each probes its own GPU and all take the smallest answer. On a CPU there is no such
wall: the whole per-process batch is taken, without accumulation.
"""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import Callable, Sequence

import torch

from .activation_checkpointing import enable_checkpointing
from .config import ConfigError, TrainConfig

logger = logging.getLogger("thuglm.train")

# Bytes of optimizer state per trainable parameter: AdamW keeps two fp32 moments; thuglm's Adafactor keeps factored
# second moments (a row and a column a matrix), small enough to leave out.
OPTIMIZER_STATE_BYTES = {"adamw": 8, "adafactor": 0}
# The share of the card a chosen batch leaves free: the allocator's fragmentation, a longer batch's extra activations.
MEMORY_MARGIN = 0.08
# How many rows are searched for the longest (a map-style dataset's first rows, or a stream's).
ROWS_SEARCHED = 1_000


def automatic_batch_rows(config: TrainConfig, processes: int, sharding: str | None) -> int:
    """The rows each of `processes` takes a step, checked for `batch_size: auto` (config.py checked the rest)."""
    if sharding:
        raise ConfigError(f"`batch_size: auto` tries batches on a whole model, and under {sharding} each process holds "
                          "shards of it: set batch_size to a number")
    if config.global_batch_size % processes:
        raise ConfigError(f"config key `global_batch_size`: {config.global_batch_size} rows a step do not split over "
                          f"{processes} processes; make it a multiple of {processes}")
    return config.global_batch_size // processes


def batch_size_candidates(rows_per_process: int) -> list[int]:
    """The batch sizes that split `rows_per_process` into whole micro-batches, largest first."""
    return [size for size in range(rows_per_process, 0, -1) if rows_per_process % size == 0]


def longest_row(dataset) -> dict:
    """The longest of the first ROWS_SEARCHED training rows (a stream is read from its start)."""
    rows = dataset.take(ROWS_SEARCHED) if hasattr(dataset, "take") else dataset
    return max(rows, key=lambda row: len(row["input_ids"]))


def choose_batch_size(candidates: Sequence[int], peak_of: Callable[[int], int], extra_bytes: int,
                      budget_bytes: int) -> int | None:
    """The first candidate whose step (`peak_of(batch)`: its peak bytes; torch.OutOfMemoryError: none) plus
    `extra_bytes` fits `budget_bytes`; None if none does."""
    for batch_size in candidates:
        try:
            peak = peak_of(batch_size)
        except torch.OutOfMemoryError:
            peak = None
        finally:
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        if peak is not None and peak + extra_bytes <= budget_bytes:
            return batch_size
        logger.info("batch_size auto: %d rows a step %s", batch_size,
                    "run out of memory" if peak is None else
                    f"need {(peak + extra_bytes) / 2**30:.1f} GiB with the optimizer state, over "
                    f"{budget_bytes / 2**30:.1f}")
    return None


def find_batch_size(model: torch.nn.Module, collator: Callable, row: dict, rows_per_process: int, *,
                    device: torch.device, optimizer: str, precision: str, gradient_checkpointing: bool) -> int:
    """The batch size for `batch_size: auto` on `device`, this process's (see the module's docstring)."""
    if device.type != "cuda":
        return rows_per_process
    model.to(device)  # where the Trainer would put it; a 4-/8-bit base is there already
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer_bytes = sum(p.numel() for p in trainable) * OPTIMIZER_STATE_BYTES[optimizer]
    _, total = torch.cuda.mem_get_info(device)
    budget = int(total * (1 - MEMORY_MARGIN))
    if gradient_checkpointing:
        enable_checkpointing(model)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
                if precision in ("bf16", "fp16") else contextlib.nullcontext())

    def peak_of(batch_size: int) -> int:
        batch = {key: value.to(device) for key, value in collator([row] * batch_size).items()}
        torch.cuda.reset_peak_memory_stats(device)
        model.train()
        try:
            with autocast:
                loss = model(**batch).loss
            loss.backward()
            torch.cuda.synchronize(device)
            return torch.cuda.max_memory_allocated()
        finally:
            model.zero_grad(set_to_none=True)

    found = choose_batch_size(batch_size_candidates(rows_per_process), peak_of, optimizer_bytes, budget)
    if found is None:
        raise torch.OutOfMemoryError(
            f"batch_size auto: even one row of {len(row['input_ids'])} tokens a step does not fit this GPU "
            f"({total / 2**30:.1f} GiB) with the optimizer state: turn gradient_checkpointing on, lower max_seq_len, "
            "or use LoRA / QLoRA (quantization: {bits: 4})"
        )
    if torch.distributed.is_available() and torch.distributed.is_initialized():  # every process takes the smallest
        smallest = torch.tensor(found, device=device)
        torch.distributed.all_reduce(smallest, op=torch.distributed.ReduceOp.MIN)
        found = int(smallest)
    torch.cuda.reset_peak_memory_stats(device)  # the run's peak is the training's, not the probe's
    return found
