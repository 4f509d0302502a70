"""Full fine-tuning of ChatGLM-6B on a 24 GB card: Adafactor on bf16 weights, stepped inside the backward pass.

Memory of full fine-tuning with AdamW at b1: bf16 weights 11.5 GiB, their gradients 11.5 GiB, two moments 23 GiB (bf16)
or 46 GiB (fp32). This module keeps the weights alone:

* **Adafactor** (Shazeer & Stern, 2018; the variant of `torch.optim.Adafactor`): no first moment, and the second
  moment of a matrix factored into a row and a column vector (for ChatGLM-6B 4 MB in all, against 46 GB for Adam);
* **in the backward pass**: each parameter is updated as soon as its gradient is complete and the gradient is freed
  right away (`Tensor.register_post_accumulate_grad_hook`, as in PyTorch's tutorial "How to save memory by fusing
  the optimizer step into the backward pass"), so at most a layer's gradients exist at once;
* **stochastic rounding** of the bf16 weights: an update of 1e-5 relative is 400 times below bf16's resolution and
  rounding to nearest drops it every time; rounding up or down with the right probabilities keeps it in expectation;
* on a GPU the update of a matrix is two fused kernels (`torch.compile`: the update's norm, then the rounded
  write), reading the bf16 gradient and weight and writing the weight; elsewhere, and where compiling fails, the same
  arithmetic runs eagerly in row chunks, so no fp32 copy of the 130,528 x 4,096 embedding is ever made.

Use it for bf16 (or fp32) weights, one backward per step (no gradient accumulation, no gradient clipping across
parameters: Adafactor clips each update's RMS instead).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import torch

from ..models.compiling import compiled

logger = logging.getLogger(__name__)

# Rows of a matrix updated at once on the eager path: 16 M elements, a 64 MB fp32 working set.
CHUNK_ELEMENTS = 1 << 24


def stochastic_round_(target: torch.Tensor, value: torch.Tensor) -> None:
    """Write fp32 `value` into `target`; into bf16 rounding up or down with probability by distance (unbiased).

    bf16 is fp32 without its low 16 bits: add uniform noise to those bits, then cut them.
    """
    _round_into(target, value)


def _scaled_update(grad, row_scale, col_scale):
    # Adafactor's update G / sqrt(V) with the rank-1 V = r c^T / mean(r): G * rsqrt(r)[:, None] * rsqrt(c / mean(r)).
    return grad.float() * row_scale[:, None] * col_scale[None, :]


def _update_square_sum(grad, row_scale, col_scale):
    return _scaled_update(grad, row_scale, col_scale).square().sum()


def _factored_scales(grad, row_var, col_var, weight, eps):
    """Update the row and column means of the squared gradient; return the update's row and column factors."""
    # vector_norm in fp32 reads the bf16 gradient without an fp32 copy of it.
    row_var.lerp_(torch.linalg.vector_norm(grad, dim=1, dtype=torch.float32).square() / grad.shape[1], weight)
    col_var.lerp_(torch.linalg.vector_norm(grad, dim=0, dtype=torch.float32).square() / grad.shape[0], weight)
    row_scale = row_var.clamp(min=eps * eps).rsqrt()
    col_scale = (col_var / row_var.mean().clamp(min=eps)).clamp(min=eps * eps).rsqrt()
    return row_scale, col_scale


def _step_size(rms, lr, clip_threshold):
    return lr / torch.clamp(rms / clip_threshold, min=1.0)


def _round_into(param, value):
    """param <- value (fp32), stochastically rounded when param is bf16 (see `stochastic_round_`)."""
    if param.dtype == torch.bfloat16:
        noise = torch.randint_like(value, 0, 1 << 16, dtype=torch.int32)
        value = ((value.view(torch.int32) + noise) & -65536).view(torch.float32)
    param.copy_(value)


def _vector_step(param, grad, var, step, lr, decay_exponent, eps, clip_threshold, weight_decay):
    """One Adafactor step of a vector (bias, LayerNorm): Adam's second moment, no factoring."""
    step.add_(1)
    var.lerp_(grad.float().square(), step**decay_exponent)
    update = grad.float() * var.clamp(min=eps * eps).rsqrt()
    step_size = _step_size(update.square().mean().sqrt(), lr, clip_threshold)
    _round_into(param, param.float() * (1 - lr * weight_decay) - step_size * update)


def _matrix_step(param, grad, row_var, col_var, step, lr, decay_exponent, eps, clip_threshold, weight_decay):
    """One Adafactor step of a matrix, whole (what the compiled path runs: a few fused kernels, no fp32 copies)."""
    step.add_(1)
    row_scale, col_scale = _factored_scales(grad, row_var, col_var, step**decay_exponent, eps)
    step_size = _step_size((_update_square_sum(grad, row_scale, col_scale) / grad.numel()).sqrt(), lr, clip_threshold)
    _round_into(param, param.float() * (1 - lr * weight_decay) - step_size * _scaled_update(grad, row_scale, col_scale))


class Adafactor(torch.optim.Optimizer):
    """Adafactor without momentum, with a fixed learning rate, stochastic rounding into bf16 weights.

    The arithmetic is `torch.optim.Adafactor`'s with `eps=(eps, 1.0)` (so its relative step size is `lr`) and
    `d=clip_threshold`, done in fp32 whatever the weights' dtype (tests/training/test_optim.py compares the two).

    lr: absolute step size (updates have an RMS of at most `clip_threshold`, like Adam's).
    beta2_decay: the second-moment decay is 1 - step ** beta2_decay.
    eps: floor of the second-moment estimate's square root. weight_decay: decoupled, as AdamW's.
    fused: update matrices with two compiled kernels (default: on CUDA).
    """

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter] | Iterable[dict],
        lr: float = 1e-5,
        beta2_decay: float = -0.8,
        eps: float = torch.finfo(torch.float32).eps,
        clip_threshold: float = 1.0,
        weight_decay: float = 0.0,
        fused: bool | None = None,
    ):
        if lr <= 0:
            raise ValueError(f"Adafactor needs lr > 0, got {lr}")
        defaults = {"lr": lr, "beta2_decay": beta2_decay, "eps": eps, "clip_threshold": clip_threshold,
                    "weight_decay": weight_decay}
        self._group_of: dict[torch.Tensor, dict] = {}
        super().__init__(params, defaults)
        self.fused = fused
        self._lr_tensors: dict[tuple[int, torch.device], tuple[float | None, torch.Tensor]] = {}

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        self._index_groups()

    def _index_groups(self) -> None:
        # step_parameter finds a parameter's settings (lr above all) through this map, so it must point at the dicts
        # in self.param_groups, the ones an LR scheduler writes.
        self._group_of = {p: group for group in self.param_groups for p in group["params"]}

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's, with two corrections for this optimizer.

        * torch replaces `param_groups` with new dicts (the saved hyperparameters): the parameters are pointed at
          them, or a scheduler created afterwards would change an lr no step reads. accelerate's `prepare` itself
          goes through here (a state-dict round trip to place the state), before the Trainer creates its scheduler.
        * torch casts the state to each parameter's dtype and leaves `step` where it was loaded: the second moments
          stay fp32 (bf16 weights would round them to bf16) and everything moves to the parameter's device.
        """
        super().load_state_dict(state_dict)
        self._index_groups()
        self._lr_tensors.clear()
        saved_ids = (index for group in state_dict["param_groups"] for index in group["params"])
        params = (param for group in self.param_groups for param in group["params"])
        for saved_id, param in zip(saved_ids, params):
            if saved_id in state_dict["state"]:
                self.state[param] = {name: value.to(device=param.device, dtype=torch.float32)
                                     for name, value in state_dict["state"][saved_id].items()}

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    self.step_parameter(param)
        return loss

    @torch.no_grad()
    def step_parameter(self, param: torch.nn.Parameter) -> None:
        """Update one parameter from its `.grad` (what the backward hook calls)."""
        group = self._group_of[param]
        grad = param.grad
        state = self.state[param]
        factored = grad.dim() == 2  # ChatGLM's weights are matrices and vectors
        if not state:
            # The step count lives on the device, so that no step reads a number back from it.
            state["step"] = torch.zeros((), dtype=torch.float32, device=grad.device)
            if factored:
                state["row_var"] = torch.zeros(grad.shape[0], dtype=torch.float32, device=grad.device)
                state["col_var"] = torch.zeros(grad.shape[1], dtype=torch.float32, device=grad.device)
            else:
                state["var"] = torch.zeros(grad.shape, dtype=torch.float32, device=grad.device)
        settings = {"decay_exponent": group["beta2_decay"], "eps": group["eps"],
                    "clip_threshold": group["clip_threshold"], "weight_decay": group["weight_decay"]}
        if self._use_fused(grad):
            try:
                # The step count and the learning rate are device tensors, so nothing recompiles from one step to
                # the next (a Python float would be compiled in as a constant).
                lr = self._lr_tensor(group, grad.device)
                if factored:
                    compiled(_matrix_step)(param, grad, state["row_var"], state["col_var"], state["step"], lr,
                                           **settings)
                else:
                    compiled(_vector_step)(param, grad, state["var"], state["step"], lr, **settings)
                return
            except Exception as error:  # noqa: BLE001  (a compiler failure must not stop training)
                logger.warning("Adafactor: fused update failed (%s); updating eagerly from now on", error)
                self.fused = False
        if factored:
            self._eager_matrix_step(param, grad, state, group["lr"], **settings)
        else:
            _vector_step(param, grad, state["var"], state["step"], group["lr"], **settings)

    def _lr_tensor(self, group: dict, device: torch.device) -> torch.Tensor:
        # Refreshed in place when a scheduler has changed group["lr"] (a fill, no host-device synchronisation).
        key = (id(group), device)
        value, tensor = self._lr_tensors.get(key) or (None, torch.zeros((), dtype=torch.float32, device=device))
        if value != group["lr"]:
            tensor.fill_(group["lr"])
        self._lr_tensors[key] = (group["lr"], tensor)
        return tensor

    def _use_fused(self, grad: torch.Tensor) -> bool:
        if self.fused is None:
            self.fused = grad.is_cuda
        return self.fused

    @staticmethod
    def _eager_matrix_step(param, grad, state, lr, decay_exponent, eps, clip_threshold, weight_decay) -> None:
        # `_matrix_step` in row chunks: no fp32 copy of a large matrix. The clipping needs the whole update's RMS
        # first, so each chunk's update is computed twice rather than kept.
        state["step"].add_(1)
        row_scale, col_scale = _factored_scales(grad, state["row_var"], state["col_var"],
                                                state["step"] ** decay_exponent, eps)
        step_rows = max(1, CHUNK_ELEMENTS // grad.shape[1])
        chunks = [slice(start, start + step_rows) for start in range(0, grad.shape[0], step_rows)]
        square_sum = sum(_update_square_sum(grad[c], row_scale[c], col_scale) for c in chunks)
        step_size = _step_size((square_sum / grad.numel()).sqrt(), lr, clip_threshold)
        for c in chunks:
            update = _scaled_update(grad[c], row_scale[c], col_scale)
            _round_into(param[c], param[c].float() * (1 - lr * weight_decay) - step_size * update)


def step_in_backward(
    optimizer: Adafactor, on_gradient: Callable[[torch.Tensor], None] | None = None,
) -> list[torch.utils.hooks.RemovableHandle]:
    """Make `loss.backward()` update every parameter of `optimizer` and free its gradient as soon as it is complete.

    After this, `optimizer.step()` finds no gradients and does nothing; call `optimizer.zero_grad()` as usual (it
    has nothing to free either). `on_gradient(grad)`, if given, sees each complete gradient just before its update
    (the Trainer sums their squares into the step's gradient norm). Returns the hook handles (`handle.remove()`
    undoes it).
    """

    def hook(param: torch.nn.Parameter) -> None:
        if on_gradient is not None:
            on_gradient(param.grad)
        optimizer.step_parameter(param)
        param.grad = None

    return [param.register_post_accumulate_grad_hook(hook)
            for group in optimizer.param_groups for param in group["params"] if param.requires_grad]
