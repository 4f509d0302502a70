"""One process of an FSDP2 run of ChatGLM on the CPU (gloo), as `configs/accelerate/fsdp_full.yaml` shards it.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/training/fsdp_worker.py MODEL OUT.json

accelerate turns FSDP on only for GPU (accelerator) process groups, so `thuglm train` under an FSDP config trains as
DDP on the CPU; this worker applies torch's `fully_shard` itself, with the layout of those configs (one unit per
ChatGLMBlock, the root holding the tied embedding / lm_head, full shard, FSDP's activation checkpointing), and writes
the loss of each step (averaged over the processes) for `test_distributed.py` to compare with one unsharded process.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper, checkpoint_wrapper
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from transformers import AutoModelForCausalLM

import thuglm  # noqa: F401
from thuglm.models.modeling_chatglm import ChatGLMBlock

STEPS, ROWS, SEQ, LR = 4, 4, 32, 1e-2


def batches(config, steps: int = STEPS) -> list[torch.Tensor]:
    """Fixed random rows laid out as `[gMASK] <sop> tokens`, the same in every process."""
    generator = torch.Generator().manual_seed(1)
    rows = []
    for _ in range(steps):
        ids = torch.randint(20, config.vocab_size - 10, (ROWS, SEQ), generator=generator)
        ids[:, 0], ids[:, 1] = config.gmask_token_id, config.bos_token_id
        rows.append(ids)
    return rows


def load(model_dir: str):
    """The model as `thuglm train` hands it to FSDP: no KV cache while training, each block in a checkpoint wrapper
    (what accelerate's fsdp_activation_checkpointing applies; its recompute would grow a cache a second time)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.config.use_cache = False
    for index, block in enumerate(model.transformer.layers):
        model.transformer.layers[index] = checkpoint_wrapper(block, preserve_rng_state=False)
    return model.train()


def train_sharded(model_dir: str) -> tuple[int, list[float]]:
    """(this process's rank, the loss of each step averaged over the processes)."""
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = load(model_dir)
    mesh = init_device_mesh("cpu", (world,))
    for module in model.modules():
        if isinstance(module, CheckpointWrapper) and isinstance(module._checkpoint_wrapped_module, ChatGLMBlock):
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    losses = []
    for ids in batches(model.config):
        local = ids.chunk(world)[rank]
        loss = model(input_ids=local, labels=local).loss
        loss.backward()  # FSDP averages the gradients over the processes: the gradient of the whole batch
        optimizer.step()
        optimizer.zero_grad()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(mean.item() / world)
    dist.destroy_process_group()
    return rank, losses


def train_alone(model_dir: str) -> list[float]:
    model = load(model_dir)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    losses = []
    for ids in batches(model.config):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


if __name__ == "__main__":
    rank, losses = train_sharded(sys.argv[1])
    if rank == 0:
        with open(sys.argv[2], "w", encoding="utf-8") as handle:
            json.dump(losses, handle)
    # Skip interpreter teardown: a C++ thread of the CPU collectives can abort the process while Python unwinds
    # ("terminate called without an active exception", seen once in CI after the results were written).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
