"""`optimizer: adafactor` and `optimizer_in_backward: true` in `thuglm train`: config, Trainer wiring, resume.

The runs train the tiny model in fp32 on the CPU for a few steps. The central check: stepping Adafactor inside the
backward pass gives the losses and gradient norms of stepping it after the backward pass, for every method.
"""

from __future__ import annotations

import io
import json
import logging
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from thuglm.cli import main
from thuglm.training import optim, recipe
from thuglm.training.config import ConfigError, check_optimizer_placement, load_config
from thuglm.training.optim import Adafactor
from thuglm.training.trainer import GlmTrainer

from .test_resume import loss_history
from .test_train_e2e import OFFICIAL_TINY, base_settings, write_config

IN_BACKWARD = {"optimizer": "adafactor", "optimizer_in_backward": True}
AFTER_BACKWARD = {"optimizer": "adafactor", "max_grad_norm": 0}  # no clipping, as in the backward pass


def settings(tmp_path: Path, name: str, **overrides) -> dict:
    values = base_settings(tmp_path, method="full", learning_rate=3e-3, eval_steps=1000, report_to=[],
                           output_dir=str(tmp_path / name))
    values["data"]["validation_split"] = 0.0
    values.update(overrides)
    return values


def train(tmp_path: Path, name: str, **overrides) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    config = write_config(folder, **settings(tmp_path, name, **overrides))
    assert main(["train", str(config)]) == 0
    return tmp_path / name


def logged(output_dir: Path, key: str) -> dict[int, float]:
    state = json.loads((output_dir / "trainer_state.json").read_text())
    return {entry["step"]: entry[key] for entry in state["log_history"] if "loss" in entry}


def optimizer_state(checkpoint: Path) -> dict:
    return torch.load(checkpoint / "optimizer.pt", weights_only=True)


# ---- config ---------------------------------------------------------------------------------------------------------
def minimal(*overrides: str):
    return load_config(None, ["model=tiny", "data.files=x", *overrides])


def test_defaults_keep_adamw_and_adafactor_takes_learning_rate_and_weight_decay():
    default = minimal()
    assert default.optimizer == "adamw" and default.optimizer_in_backward is False
    assert default.max_grad_norm == 1.0
    assert recipe.optimizer_cls_and_kwargs(default) is None  # the Trainer's own AdamW, as before

    adafactor = minimal("method=full", "optimizer=adafactor", "weight_decay=0.1")
    assert recipe.optimizer_cls_and_kwargs(adafactor) == (Adafactor, {"lr": 2e-5, "weight_decay": 0.1})
    assert adafactor.max_grad_norm == 1.0  # stepped after the backward pass, it is clipped as AdamW is

    assert minimal("optimizer=adafactor", "optimizer_in_backward=true").max_grad_norm == 0.0
    explicit_off = minimal("optimizer=adafactor", "optimizer_in_backward=true", "max_grad_norm=0")
    assert explicit_off.max_grad_norm == 0.0


def test_an_unknown_optimizer_is_named_with_the_valid_ones():
    with pytest.raises(ConfigError, match=r"config key `optimizer` must be one of adamw, adafactor; got 'sgd'"):
        minimal("optimizer=sgd")
    with pytest.raises(ConfigError, match=r"got 'adafacter' \(did you mean `adafactor`\?\)"):
        minimal("optimizer=adafacter")


IN_BACKWARD_OVERRIDES = ["optimizer=adafactor", "optimizer_in_backward=true"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["optimizer_in_backward=true"], "not `optimizer: adamw`: add `optimizer: adafactor`"),
        ([*IN_BACKWARD_OVERRIDES, "gradient_accumulation_steps=2"],
         "cannot accumulate gradients over micro-batches (gradient_accumulation_steps 2): raise batch_size instead"),
        ([*IN_BACKWARD_OVERRIDES, "batch_size=2", "global_batch_size=8"], "(global_batch_size 8 with batch_size 2)"),
        ([*IN_BACKWARD_OVERRIDES, "max_grad_norm=1.0"], "`max_grad_norm: 1.0` clips the norm of all gradients"),
        ([*IN_BACKWARD_OVERRIDES, "on_nan=skip"], "`on_nan: skip` cannot skip a step whose update"),
        ([*IN_BACKWARD_OVERRIDES, "precision=fp16"], "`precision: fp16` scales the loss"),
    ],
)
def test_settings_that_cannot_work_in_the_backward_pass_are_config_errors(overrides, message):
    with pytest.raises(ConfigError) as error:
        minimal(*overrides)
    assert message in str(error.value)
    assert "or set optimizer_in_backward: false" in str(error.value)  # every refusal names the way out


def test_launch_dependent_refusals():
    in_backward = minimal("optimizer=adafactor", "optimizer_in_backward=true")
    with pytest.raises(ConfigError, match=r"one process on one GPU, and this run has 2 .*CUDA_VISIBLE_DEVICES=0"):
        check_optimizer_placement(in_backward, processes=2, precision="bf16", sharding=None)
    with pytest.raises(ConfigError, match=r"precision fp16 \(what `precision: auto` chose on this GPU"):
        check_optimizer_placement(in_backward, processes=1, precision="fp16", sharding=None)
    with pytest.raises(ConfigError, match="under FSDP each process holds shards of them: use optimizer: adamw"):
        check_optimizer_placement(minimal("optimizer=adafactor"), processes=2, precision="bf16", sharding="FSDP")
    check_optimizer_placement(minimal("optimizer=adafactor"), processes=2, precision="fp16", sharding=None)  # DDP
    check_optimizer_placement(minimal(), processes=2, precision="bf16", sharding="DeepSpeed")
    check_optimizer_placement(in_backward, processes=1, precision="bf16", sharding=None)


def test_in_backward_with_several_processes_exits_2_before_anything_is_written(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(recipe, "data_parallel_size", lambda state: 2)  # what torchrun --nproc-per-node 2 gives
    config = write_config(tmp_path, **settings(tmp_path, "out", **IN_BACKWARD))
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert "`optimizer_in_backward: true` trains in one process on one GPU, and this run has 2" in err
    assert "DDP averages the gradients in backward hooks of its own" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_nproc_refuses_in_backward_before_starting_any_process(tmp_path, capsys, monkeypatch):
    started = []
    monkeypatch.setattr("torch.distributed.run.run", lambda args: started.append(args))
    config = write_config(tmp_path, **settings(tmp_path, "out", **IN_BACKWARD))
    assert main(["train", "--nproc", "2", str(config)]) == 2
    assert "this run has 2" in capsys.readouterr().err
    assert not started and not (tmp_path / "out").exists()  # refused by `thuglm train --nproc` itself


# ---- training -------------------------------------------------------------------------------------------------------
@pytest.fixture
def gradients_at_the_clip_point(monkeypatch) -> list[int]:
    """How many trainable parameters hold a gradient where the Trainer clips and measures them, step by step."""
    seen: list[int] = []
    original = GlmTrainer._get_grad_norm

    def spy(self, model, grad_norm=None):
        seen.append(sum(p.grad is not None for p in model.parameters() if p.requires_grad))
        return original(self, model, grad_norm=grad_norm)

    monkeypatch.setattr(GlmTrainer, "_get_grad_norm", spy)
    return seen


@pytest.mark.parametrize("method", ["full", "lora", "freeze"])
def test_in_backward_trains_exactly_like_stepping_after_the_backward_pass(
    tmp_path, method, gradients_at_the_clip_point, caplog,
):
    caplog.set_level(logging.INFO, logger="thuglm")
    extra = {"method": method, "freeze": {"trainable_layers": 1}, "learning_rate": 1e-2 if method == "lora" else 3e-3}
    after = train(tmp_path, "after", **AFTER_BACKWARD, **extra)
    trainable = gradients_at_the_clip_point[0]
    assert trainable > 0 and gradients_at_the_clip_point == [trainable] * 8
    gradients_at_the_clip_point.clear()
    inside = train(tmp_path, "inside", **IN_BACKWARD, **extra)
    assert gradients_at_the_clip_point == [0] * 8  # each was freed as soon as its weight was updated

    expected, got = loss_history(after), loss_history(inside)
    assert sorted(got) == sorted(expected) == list(range(1, 9))
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-6), step
    # The hooks measure the gradient norm that the Trainer measures after the backward pass.
    assert logged(inside, "grad_norm") == pytest.approx(logged(after, "grad_norm"), rel=1e-5)
    assert all(norm > 0 for norm in logged(inside, "grad_norm").values())
    losses = [got[step] for step in sorted(got)]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1, losses  # it trains
    assert "max_grad_norm: off (optimizer_in_backward never holds all the gradients" in caplog.text
    assert f"({method}, fp32, adafactor in the backward pass)" in caplog.text

    # The checkpoints hold Adafactor's state: factored second moments of the matrices, in fp32.
    state = optimizer_state(inside / "checkpoint-8")["state"]
    assert len(state) == trainable and all(float(values["step"]) == 8 for values in state.values())
    matrices = [values for values in state.values() if "row_var" in values]
    assert matrices and all(values["col_var"].dtype == torch.float32 for values in matrices)
    if method == "freeze":  # the frozen layers have no hooks: only the last layer moved
        trained = AutoModelForCausalLM.from_pretrained(inside).state_dict()
        original = AutoModelForCausalLM.from_pretrained(OFFICIAL_TINY).state_dict()
        changed = {name for name, value in trained.items() if not torch.equal(value, original[name])}
        assert changed and all(name.startswith("transformer.layers.1.") for name in changed), changed


def test_adafactor_accumulates_gradients_like_one_larger_batch(tmp_path):
    whole = train(tmp_path, "whole", optimizer="adafactor", batch_size=4)
    accumulated = train(tmp_path, "accumulated", optimizer="adafactor", batch_size=2, gradient_accumulation_steps=2)
    expected, got = loss_history(whole), loss_history(accumulated)
    assert sorted(got) == sorted(expected) == list(range(1, 9))
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=2e-2), (step, got, expected)
    assert got[8] < got[1] - 1.0
    assert json.loads((accumulated / "metrics.json").read_text())["global_batch_size"] == 4


@pytest.mark.parametrize("optimizer", [AFTER_BACKWARD, IN_BACKWARD], ids=["after_backward", "in_backward"])
def test_the_lr_scheduler_sets_the_lr_adafactor_applies(tmp_path, monkeypatch, optimizer):
    applied: dict[int, set[float]] = {}  # step -> the lr of every vector update in that step
    original = optim._vector_step

    def spy(param, grad, var, step, lr, *args, **kwargs):
        applied.setdefault(int(step) + 1, set()).add(float(lr))
        return original(param, grad, var, step, lr, *args, **kwargs)

    monkeypatch.setattr(optim, "_vector_step", spy)
    # 3 warmup steps (0, 1/3, 2/3 of learning_rate), then a linear decay over the other 3.
    out = train(tmp_path, "out", **optimizer, max_steps=6, save_steps=1, warmup_ratio=0.5, lr_scheduler="linear")
    scheduled = logged(out, "learning_rate")
    assert scheduled == pytest.approx({1: 0.0, 2: 1e-3, 3: 2e-3, 4: 3e-3, 5: 2e-3, 6: 1e-3})
    assert sorted(applied) == list(range(1, 7)) and all(len(lrs) == 1 for lrs in applied.values()), applied
    assert {step: lrs.pop() for step, lrs in applied.items()} == pytest.approx(scheduled)

    # lr 0 at the first step: it changed no weight; the second did.
    original_weights = AutoModelForCausalLM.from_pretrained(OFFICIAL_TINY).state_dict()
    first = AutoModelForCausalLM.from_pretrained(out / "checkpoint-1").state_dict()
    second = AutoModelForCausalLM.from_pretrained(out / "checkpoint-2").state_dict()
    assert all(torch.equal(first[name], value) for name, value in original_weights.items())
    assert not torch.equal(second["lm_head.weight"], original_weights["lm_head.weight"])


@pytest.mark.parametrize("optimizer", [{"optimizer": "adafactor"}, IN_BACKWARD], ids=["after_backward", "in_backward"])
def test_a_resumed_run_continues_with_the_losses_of_an_uninterrupted_one(tmp_path, optimizer):
    reference = train(tmp_path, "reference", **optimizer)
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(reference / "checkpoint-4", resumed / "checkpoint-4")  # as a run stopped after step 4 left it
    config = write_config(tmp_path, **settings(tmp_path, "resumed", **optimizer))
    assert main(["train", str(config), "resume_from_checkpoint=true"]) == 0

    expected, got = loss_history(reference), loss_history(resumed)
    assert sorted(got) == sorted(expected) == list(range(1, 9))
    for step in range(5, 9):
        assert got[step] == pytest.approx(expected[step], abs=1e-6, rel=1e-6), step
    assert json.loads((resumed / "metrics.json").read_text())["steps"] == 8
    assert float(optimizer_state(resumed / "checkpoint-8")["state"][0]["step"]) == 8


def test_adafactor_state_dict_round_trips_in_fp32_and_follows_the_loaded_groups():
    def weights():
        generator = torch.Generator().manual_seed(0)
        return [torch.nn.Parameter(torch.randn(shape, generator=generator).to(dtype))
                for shape, dtype in (((64, 32), torch.bfloat16), ((32,), torch.bfloat16), ((16, 8), torch.float32))]

    def step(optimizer, params, seed):
        generator = torch.Generator().manual_seed(seed)
        for param in params:
            param.grad = torch.randn(param.shape, generator=generator).to(param.dtype)
        torch.manual_seed(seed)  # the stochastic rounding draws from the global generator
        optimizer.step()

    trained = weights()
    first = Adafactor(trained, lr=1e-2, weight_decay=0.1)
    for seed in range(3):
        step(first, trained, seed)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)

    restored = [torch.nn.Parameter(p.detach().clone()) for p in trained]
    second = Adafactor(restored, lr=5.0)  # the saved hyperparameters replace these
    second.load_state_dict(torch.load(buffer, weights_only=True))
    for ours, theirs in zip(restored, trained):
        for name, value in first.state[theirs].items():
            assert second.state[ours][name].dtype == torch.float32  # torch alone would make them bf16
            assert torch.equal(second.state[ours][name], value), name
    for seed in range(3, 5):
        step(first, trained, seed)
        step(second, restored, seed)
    assert all(torch.equal(a, b) for a, b in zip(restored, trained))

    # A scheduler writes the lr into the loaded groups; the next step reads it there (lr 0: nothing moves).
    for group in second.param_groups:
        group["lr"] = 0.0
    before = [p.detach().clone() for p in restored]
    step(second, restored, 9)
    assert all(torch.equal(a, b) for a, b in zip(restored, before))


# ---- NaN ------------------------------------------------------------------------------------------------------------
def test_a_nan_loss_in_backward_stops_the_run_and_says_its_update_was_applied(tmp_path, capsys, nan_at_step_7,
                                                                                monkeypatch):
    out = tmp_path / "out"
    config = write_config(tmp_path, **settings(tmp_path, "out", **IN_BACKWARD, max_steps=12, save_steps=5))
    assert main(["train", str(config)]) == 2
    [message] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("thuglm: ")]
    assert message.startswith("thuglm: step 7: the loss became nan; optimizer_in_backward had already applied this "
                              "step's update in the backward pass"), message
    assert "spoiled weights in memory, which were not saved" in message and "checkpoint-5" in message, message
    assert sorted(path.name for path in out.glob("checkpoint-*")) == ["checkpoint-5"]
    assert not (out / "metrics.json").exists() and not (out / "model.safetensors").exists()
    weights = load_file(out / "checkpoint-5" / "model.safetensors")
    assert all(torch.isfinite(tensor).all() for tensor in weights.values())

    monkeypatch.undo()  # the bad batch is fixed: resume from the good checkpoint
    assert main(["train", str(config), "resume_from_checkpoint=true"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 12 and math.isfinite(metrics["final_train_loss"])
