"""thuglm's Adafactor stepping each weight inside the backward pass."""

from __future__ import annotations

import torch

from ..optim import Adafactor, step_in_backward


class OptimizerInBackward:
    """`optimizer_in_backward=True` (with `optimizer_cls_and_kwargs=(Adafactor, ...)`) hooks the optimizer into the
    backward pass (`optim.step_in_backward`): each weight is updated, and its gradient freed, as soon as the gradient
    is complete; the Trainer's `optimizer.step()` and `zero_grad()` then find no gradients and do nothing, and its
    LR scheduler sets the lr the hooks read, as usual. The hooks sum the squares of the gradients on the device, so
    the step's gradient norm is still logged (and checked, with `NonFiniteGuard`: list this part before it, so that
    the guard sees the hooks' norm and stops with this part's message).

    The config refuses what cannot work with it (`check_optimizer_in_backward`, `check_optimizer_placement`):
    gradient accumulation and clipping over all weights (no moment holds all the gradients), skipping a non-finite
    step and fp16's loss scaling (the update is applied before anything could skip it), and several processes.
    """

    def __init__(self, *args, optimizer_in_backward: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.optimizer_in_backward = optimizer_in_backward
        self._backward_hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._grad_square_sum: torch.Tensor | None = None  # this step's, summed by the hooks

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        if self.optimizer_in_backward and not self._backward_hooks:  # the Trainer may call this again
            if not isinstance(optimizer, Adafactor):
                raise TypeError(f"optimizer_in_backward needs thuglm's Adafactor, not {type(optimizer).__name__}")
            self._backward_hooks = step_in_backward(optimizer, on_gradient=self._add_to_grad_norm)
        return optimizer

    def _add_to_grad_norm(self, grad: torch.Tensor) -> None:
        # On the device, without reading it back (no synchronisation in the backward pass); fp32 accumulation over
        # a bf16 gradient without an fp32 copy of it.
        square = torch.linalg.vector_norm(grad, dtype=torch.float32).square()
        self._grad_square_sum = square if self._grad_square_sum is None else self._grad_square_sum + square

    def _get_grad_norm(self, model, grad_norm=None):
        if self.optimizer_in_backward and self._grad_square_sum is not None:
            # The gradients are gone; the hooks measured them on the way. Handed on as the step's norm, for the
            # parts after this one (a NaN guard) to check.
            grad_norm, self._grad_square_sum = self._grad_square_sum.sqrt(), None
        return super()._get_grad_norm(model, grad_norm=grad_norm)

    def nonfinite_stop_message(self, step: int, what: str, kept: str) -> str:
        if not self.optimizer_in_backward:
            return super().nonfinite_stop_message(step, what, kept)
        # The hooks have applied this step's update: say so; nothing is saved after it.
        return (f"step {step}: {what}; optimizer_in_backward had already applied this step's update in the backward "
                f"pass, so the run stopped with spoiled weights in memory, which were not saved; {kept}. Lower "
                "learning_rate or look for broken rows in the data (on_nan=skip needs optimizer_in_backward: false).")
