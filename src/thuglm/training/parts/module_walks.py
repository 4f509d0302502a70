"""The training loop's walks over the module tree, each done once."""

from __future__ import annotations

import torch
from accelerate.utils import DistributedType


class ModuleWalksOnce:
    """The Trainer walks the whole module tree several times a step (`model.train()`, `model.zero_grad()`, the
    parameters to clip, the parameter count of its FLOP estimate): ~1,400 modules for LoRA on ChatGLM-6B, on a host
    that the LoRA step on a GPU already keeps busy. Here the walks go over lists taken when training starts
    (`WalkShortcuts`), on one process and under DDP, where the tree does not change (FSDP and DeepSpeed give train()
    and zero_grad() meanings of their own: there the Trainer's walks stay).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._walks: WalkShortcuts | None = None  # on the model the training loop runs
        self._non_embedding_parameters: int | None = None  # for the FLOP estimate, counted once

    def training_step(self, model, inputs, num_items_in_batch=None):
        self._shortcut_walks(model)
        return super().training_step(model, inputs, num_items_in_batch)

    def train(self, *args, **kwargs):
        try:
            return super().train(*args, **kwargs)
        finally:  # the model leaves the loop as it came, also when the run stops with an error
            self._drop_walk_shortcuts()

    def _shortcut_walks(self, model: torch.nn.Module) -> None:
        if (self._walks is not None and self._walks.model is model) or self.accelerator.distributed_type not in (
            DistributedType.NO, DistributedType.MULTI_GPU, DistributedType.MULTI_CPU,
        ):
            return
        self._drop_walk_shortcuts()
        self._walks = WalkShortcuts(model)

    def _drop_walk_shortcuts(self) -> None:
        if self._walks is not None:
            self._walks.remove()
            self._walks = None

    def _clip_grad_norm(self, model):
        if self._walks is None or self._walks.model is not model:
            return super()._clip_grad_norm(model)
        return self.accelerator.clip_grad_norm_(self._walks.parameters, self.args.max_grad_norm)

    def floating_point_ops(self, inputs) -> int:
        """The Trainer's estimate, 6 x input tokens x non-embedding parameters, with the parameters counted once."""
        main_input = getattr(self.model, "main_input_name", "input_ids")
        if main_input not in inputs or not hasattr(self.model, "num_parameters"):
            return 0
        if self._non_embedding_parameters is None:
            self._non_embedding_parameters = self.model.num_parameters(exclude_embeddings=True)
        return 6 * inputs[main_input].numel() * self._non_embedding_parameters


class WalkShortcuts:
    """Gives `model` a `train()` and a `zero_grad()` that go over lists of its modules and parameters taken now,
    until `remove()`; `parameters` is the list, for clipping.

    Both are what torch's do as long as no module is added or removed: `train(mode)` still sets every module's mode
    when any differs (after an evaluation), through the model's own `train`; `zero_grad()` sets every gradient to
    None. They exist for the training loop, which calls both every step on a tree that does not change.
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.modules = list(model.modules())
        self.parameters = list(model.parameters())
        model.train, model.zero_grad = self.train, self.zero_grad  # instance attributes, found before the class's

    def train(self, mode: bool = True) -> torch.nn.Module:
        if any(module.training != mode for module in self.modules):
            type(self.model).train(self.model, mode)
        return self.model

    def zero_grad(self, set_to_none: bool = True) -> None:
        if not set_to_none:
            type(self.model).zero_grad(self.model, set_to_none)
            return
        for parameter in self.parameters:
            parameter.grad = None

    def remove(self) -> None:
        for name in ("train", "zero_grad"):
            self.model.__dict__.pop(name, None)
