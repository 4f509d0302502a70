"""Adafactor in the backward pass: torch's Adafactor arithmetic, unbiased bf16 rounding, gradients freed."""

import pytest
import torch

from thuglm.training import optim
from thuglm.training.optim import Adafactor, step_in_backward, stochastic_round_


def params(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(0.1 * torch.randn(shape, generator=generator)) for shape in ((37, 23), (23,))]


def set_grads(tensors, seed):
    generator = torch.Generator().manual_seed(seed)
    for p in tensors:
        p.grad = torch.randn(p.shape, generator=generator) * (10.0 if p.dim() == 1 else 1e-3)


@pytest.mark.parametrize("chunk_elements", [1 << 24, 50])  # one pass, and the two-pass row-chunked path
def test_fp32_steps_equal_torch_adafactor(monkeypatch, chunk_elements):
    monkeypatch.setattr(optim, "CHUNK_ELEMENTS", chunk_elements)
    ours, reference = params(), params()
    ours_opt = Adafactor(ours, lr=0.01, weight_decay=0.1, clip_threshold=1.0)
    # eps2=1.0 makes torch's relative step size max(1.0, RMS(p)) * min(lr, 1/sqrt(t)) = lr for these weights.
    torch_opt = torch.optim.Adafactor(reference, lr=0.01, eps=(torch.finfo(torch.float32).eps, 1.0),
                                      weight_decay=0.1, d=1.0, foreach=False)
    for step in range(4):
        set_grads(ours, step)
        set_grads(reference, step)
        ours_opt.step()
        torch_opt.step()
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_stochastic_rounding_is_unbiased_and_lands_on_bf16_values():
    value = torch.full((200_000,), 1.0 + 2**-10)  # a quarter of the way from 1.0 to the next bf16 value
    target = torch.empty(value.shape, dtype=torch.bfloat16)
    stochastic_round_(target, value.clone())
    assert set(target.float().unique().tolist()) == {1.0, 1.0 + 2**-7}
    assert abs(target.float().mean().item() - value[0].item()) < 2e-5
    negative = torch.empty_like(target)
    stochastic_round_(negative, -value.clone())
    assert abs(negative.float().mean().item() + value[0].item()) < 2e-5


def test_bf16_weights_move_by_updates_far_below_their_resolution():
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.ones(4096, 16, dtype=torch.bfloat16))
    optimizer = Adafactor([weight], lr=1e-4)
    for _ in range(20):
        weight.grad = torch.ones_like(weight)
        optimizer.step()
    # Each step moves 1e-4 (the update's RMS is 1), 78 times below bf16's spacing at 1.0.
    assert abs(weight.float().mean().item() - (1.0 - 20 * 1e-4)) < 2e-4


def test_backward_steps_every_parameter_and_frees_its_gradient(model):
    trained = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in trained]
    optimizer = Adafactor(trained, lr=1e-3)
    step_in_backward(optimizer)
    ids = torch.randint(5, 100, (2, 10))
    ids[:, 0], ids[:, 1] = model.config.gmask_token_id, model.config.bos_token_id
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is None for p in trained)
    assert all(not torch.equal(p, b) for p, b in zip(trained, before))
    assert all(optimizer.state[p]["step"] == 1 for p in trained)  # the tied lm_head / embedding: once
