"""LoRA's fused dropout (training/lora_dropout.py): the kernels against the same mask applied by hand, the mask's
share and seeds, its replay under gradient checkpointing, and the swap in a peft model. Without a GPU the kernels
run in Triton's CPU interpreter, which has no bf16: there the half precision is fp16."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from thuglm.cli import main
from thuglm.training import methods, recipe

from .test_train_e2e import OFFICIAL_TINY, assert_losses_fall, base_settings, write_config

pytest.importorskip("triton")
from thuglm.training import lora_dropout  # without a GPU, in Triton's interpreter: tests/conftest.py

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HALF = torch.bfloat16 if torch.cuda.is_available() else torch.float16


@pytest.fixture(autouse=True)
def kernels_on_this_device(monkeypatch):
    monkeypatch.setattr(lora_dropout, "ON_CPU", not torch.cuda.is_available())


def seed_tensor(value: int) -> torch.Tensor:
    return torch.tensor([value], dtype=torch.int64, device=DEVICE)


@pytest.mark.parametrize(("rows", "width", "rank", "p"), [(100, 128, 8, 0.3), (70, 64, 16, 0.05), (130, 192, 4, 0.5)])
def test_the_product_and_both_gradients_are_those_of_the_mask_applied_by_hand(rows, width, rank, p):
    torch.manual_seed(0)
    x = torch.randn(rows, width, dtype=HALF, device=DEVICE, requires_grad=True)
    weight = torch.randn(rank, width, dtype=HALF, device=DEVICE, requires_grad=True)
    seed = seed_tensor(1234)
    out, bits = lora_dropout.dropout_linear(x, weight, seed, p)
    grad = torch.randn_like(out)
    out.backward(grad)

    keep = lora_dropout.kept_mask(bits)
    dropped = x.detach().float() * keep / (1 - p)
    w = weight.detach().float()
    for got, want in ((out, dropped @ w.T), (x.grad, (grad.float() @ w) * keep / (1 - p)),
                      (weight.grad, grad.float().T @ dropped)):
        assert got.dtype == HALF
        torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item())


def drawn_mask(seed: int, p: float, rows: int, width: int) -> torch.Tensor:
    x = torch.ones(rows, width, dtype=HALF, device=DEVICE)
    return lora_dropout.kept_mask(lora_dropout.dropout_linear(x, x.new_ones(8, width), seed_tensor(seed), p)[1])


def test_the_mask_keeps_one_minus_p_and_depends_on_the_seed_alone():
    rows, width, p = 256, 512, 0.25
    mask = drawn_mask(7, p, rows, width)
    assert abs(mask.float().mean().item() - (1 - p)) < 0.01
    assert abs(mask.float().mean(dim=0).std().item() - (p * (1 - p) / rows) ** 0.5) < 0.01  # columns alike
    assert abs(mask.float().mean(dim=1).std().item() - (p * (1 - p) / width) ** 0.5) < 0.01  # rows alike
    assert torch.equal(mask, drawn_mask(7, p, rows, width))
    assert (mask != drawn_mask(8, p, rows, width)).float().mean() > 0.3


@pytest.mark.parametrize("launch", [lora_dropout.Launch(block_rows=32, programs=16),
                                    lora_dropout.Launch(block_rows=128, num_warps=8, num_stages=1, programs=4)])
def test_a_kernels_launch_settings_change_neither_the_mask_nor_the_results(launch):
    # What check_lora_dropout.py --sweep tries: other rows a program and other splits of the reductions.
    torch.manual_seed(0)
    x = torch.randn(200, 256, dtype=HALF, device=DEVICE)
    weight = torch.randn(8, 256, dtype=HALF, device=DEVICE)
    grad = torch.randn(200, 8, dtype=HALF, device=DEVICE)
    seed = seed_tensor(11)
    partial, bits = lora_dropout.forward_partials(x, weight, seed, 0.1)
    other_partial, other_bits = lora_dropout.forward_partials(x, weight, seed, 0.1, launch)
    assert other_partial.shape[0] != partial.shape[0]  # the reduction split otherwise
    assert torch.equal(other_bits, bits)
    torch.testing.assert_close(other_partial.sum(0), partial.sum(0), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lora_dropout.input_grad(grad, weight, bits, 0.1, launch),
                               lora_dropout.input_grad(grad, weight, bits, 0.1))
    torch.testing.assert_close(lora_dropout.weight_grad_partials(grad, x, bits, 0.1, launch).sum(0),
                               lora_dropout.weight_grad_partials(grad, x, bits, 0.1).sum(0), rtol=1e-4, atol=1e-4)


def test_without_gradient_for_the_input_only_the_weights_gradient_is_computed(monkeypatch):
    x = torch.randn(64, 64, dtype=HALF, device=DEVICE)
    weight = torch.randn(8, 64, dtype=HALF, device=DEVICE, requires_grad=True)
    monkeypatch.setattr(lora_dropout, "dropout_linear_input_grad", lambda *args: pytest.fail("input gradient made"))
    lora_dropout.dropout_linear(x, weight, seed_tensor(3), 0.1)[0].sum().backward()
    assert weight.grad is not None


def adapter_a(p: float = 0.2) -> lora_dropout.DropoutLinear:
    torch.manual_seed(1)
    return lora_dropout.DropoutLinear(torch.nn.Linear(128, 8, bias=False, device=DEVICE), p)


def test_gradient_checkpointing_recomputes_the_forwards_mask():
    layer = adapter_a()
    x = torch.randn(2, 40, 128, dtype=HALF, device=DEVICE, requires_grad=True)

    def gradients(checkpointed: bool):
        torch.manual_seed(5)
        x.grad = layer.weight.grad = None
        run = (lambda t: torch.utils.checkpoint.checkpoint(layer, t, use_reentrant=False)) if checkpointed else layer
        (run(x).float() ** 2).sum().backward()
        return x.grad.clone(), layer.weight.grad.clone()

    plain, replayed = gradients(False), gradients(True)
    assert torch.equal(plain[0], replayed[0]) and torch.equal(plain[1], replayed[1])


def test_evaluation_drops_nothing_and_fp32_inputs_take_torchs_dropout():
    layer = adapter_a()
    x = torch.randn(3, 128, device=DEVICE)
    assert torch.equal(layer.eval()(x), F.linear(x, layer.weight))
    layer.train()
    torch.manual_seed(9)
    fused_or_not = layer(x)
    torch.manual_seed(9)
    assert torch.equal(fused_or_not, F.linear(F.dropout(x, 0.2, training=True), layer.weight))


def lora_model(tmp_path, **lora):
    settings = base_settings(tmp_path, method="lora", report_to=[],
                             lora={"dropout": 0.1, "fused_dropout": True, **lora})
    config = recipe.load_config(str(write_config(tmp_path, **settings)), [])
    model = methods.load_base_model(OFFICIAL_TINY, torch.float32, "sdpa")
    return methods.prepare_for_method(model, config)


def test_a_gpu_runs_lora_with_the_fused_dropout_and_the_adapter_keeps_its_keys(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(methods, "fused_dropout_available", lambda: False)
    plain = lora_model(tmp_path)  # asked for, where it cannot run: said, and peft's dropout kept
    assert "lora.fused_dropout needs a CUDA GPU" in caplog.text
    assert not any(isinstance(module, lora_dropout.DropoutLinear) for module in plain.modules())
    monkeypatch.setattr(methods, "fused_dropout_available", lambda: True)
    fused = lora_model(tmp_path)
    adapted = [module for module in fused.modules() if hasattr(module, "lora_A")]
    assert adapted and all(isinstance(module.lora_A["default"], lora_dropout.DropoutLinear)
                           and isinstance(module.lora_dropout["default"], torch.nn.Identity) for module in adapted)
    assert fused.state_dict().keys() == plain.state_dict().keys()
    fused.load_state_dict(plain.state_dict())

    torch.manual_seed(0)
    ids = torch.randint(20, 200, (2, 24))
    ids[:, 8], ids[:, 9] = plain.config.gmask_token_id, plain.config.bos_token_id  # [gMASK] <sop>
    labels = ids.clone()
    labels[:, :10] = -100
    with torch.no_grad():  # evaluation drops nothing, fused or not
        assert torch.equal(fused.eval()(input_ids=ids, labels=labels).loss, plain.eval()(input_ids=ids, labels=labels).loss)

    # A training step in half precision through the kernels: every adapter gets a finite gradient (lora_B made
    # non-zero first, as training makes it: peft starts it at zero, and lora_A's gradient with it).
    with torch.no_grad():
        for module in adapted:
            module.lora_B["default"].weight.normal_(std=0.1)
    fused.half().to(DEVICE).train()
    loss = fused(input_ids=ids.to(DEVICE), labels=labels.to(DEVICE)).loss
    loss.backward()
    assert torch.isfinite(loss)
    for module in adapted:
        assert torch.isfinite(module.lora_A["default"].weight.grad).all()
        assert module.lora_A["default"].weight.grad.abs().sum() > 0

    assert not any(isinstance(module, lora_dropout.DropoutLinear)
                   for module in lora_model(tmp_path, fused_dropout=False).modules())
    assert not any(isinstance(module, lora_dropout.DropoutLinear)
                   for module in lora_model(tmp_path, dropout=0.0).modules())


def test_thuglm_train_fuses_the_dropout_and_saves_a_plain_lora_adapter(tmp_path, monkeypatch, caplog):
    """The recipe's path (on the CPU the tiny model trains in fp32, where the layer takes torch's dropout): the
    adapter saved loads into peft as any other."""
    from peft import PeftModel

    monkeypatch.setattr(methods, "fused_dropout_available", lambda: True)
    caplog.set_level(logging.INFO, logger="thuglm.train")
    settings = base_settings(tmp_path, method="lora", report_to=[], save_steps=0,
                             lora={"dropout": 0.1, "fused_dropout": True})
    assert main(["train", str(write_config(tmp_path, **settings))]) == 0
    assert "LoRA dropout drawn inside 8 adapters' products" in caplog.text
    out = tmp_path / "out"
    assert_losses_fall(out)
    base = methods.load_base_model(OFFICIAL_TINY, torch.float32, "sdpa")
    loaded = PeftModel.from_pretrained(base, out)
    assert all(type(module.lora_A["default"]) is torch.nn.Linear
               for module in loaded.modules() if hasattr(module, "lora_A"))


@pytest.mark.parametrize("dropout", ["1.0", "-0.1"])
def test_a_dropout_outside_zero_to_one_is_refused_in_one_line(tmp_path, capsys, dropout):
    settings = base_settings(tmp_path, method="lora", report_to=[])
    assert main(["train", str(write_config(tmp_path, **settings)), f"lora.dropout={dropout}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "`lora.dropout` must be at least 0 and below 1" in err, err
    assert not (tmp_path / "out").exists()
