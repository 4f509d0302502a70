"""`task: dpo`: preference tuning through `thuglm train` on the tiny model.

The losses against hand computation from explicit per-token log-probs, a surface preference learned and carried over
to held-out pairs (the reward accuracy computed here from the saved adapter), bad rows, resume, and two processes.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest
import torch
import torch.nn.functional as F
import yaml
from datasets import Dataset
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

import thuglm  # noqa: F401
from thuglm.cli import main
from thuglm.data.collator import GlmCollator
from thuglm.data.preference import PreferenceCollator, encode_pairs
from thuglm.models.losses import IGNORE_INDEX
from thuglm.models.prompt import build_prompt
from thuglm.training.config import DpoSettings, load_config
from thuglm.training.demo import resource_path
from thuglm.training.tasks import dpo
from thuglm.training.tasks.dpo import Dpo, PreferenceTrainer

from .test_data_formats import refused, write_json
from .test_resume import loss_history

LOSS_TYPES = ("sigmoid", "ipo", "orpo", "simpo")
INSTRUCTIONS = json.loads(resource_path("alpaca", "instructions.json").read_text(encoding="utf-8"))


def surface_pairs(rows: list[dict]) -> list[dict]:
    """The same answer twice: the chosen one opens with 好的！, the rejected one with 不行。"""
    return [{"instruction": row["instruction"], "input": row["input"], "chosen": "好的！" + row["output"][:16],
             "rejected": "不行。" + row["output"][:16]} for row in rows]


def dpo_config(folder: Path, model, files, **settings) -> Path:
    values = {
        "model": str(model), "task": "dpo", "method": "lora",
        "data": {"files": [str(file) for file in files], "format": "alpaca", "cache_dir": str(folder / "hf-cache")},
        "output_dir": str(folder / "out"), "max_seq_len": 64, "max_steps": 4, "batch_size": 4, "learning_rate": 1e-2,
        "warmup_ratio": 0.0, "lora": {"dropout": 0.0}, "logging_steps": 1, "save_steps": 0, "report_to": [],
        "precision": "fp32", "seed": 0,
    }
    for key, value in settings.items():
        values[key] = {**values[key], **value} if isinstance(value, dict) and key in values else value
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(values, allow_unicode=True), encoding="utf-8")
    return path


# ---- the losses, by hand -------------------------------------------------------------------------------------------
def explicit_logps(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence sums of per-token log-probs of the labels from the full logits (log_softmax, gather)."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"]).logits.float()
    labels = batch["labels"][:, 1:]
    per_token = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    counted = labels != IGNORE_INDEX
    return (per_token * counted).sum(-1), counted.sum(-1)


def hand_loss(loss_type: str, beta: float, gamma: float, policy, reference, tokens) -> float:
    (pc, pr), (rc, rr), (nc, nr) = (t.chunk(2) for t in (policy, reference, tokens))
    if loss_type == "sigmoid":
        return (-F.logsigmoid(beta * ((pc - rc) - (pr - rr)))).mean().item()
    if loss_type == "ipo":
        return (((pc - rc) / nc - (pr - rr) / nr - 1 / (2 * beta)) ** 2).mean().item()
    ac, ar = pc / nc, pr / nr  # mean log-prob a token
    if loss_type == "orpo":
        log_odds = (ac - ar) - (torch.log1p(-torch.exp(ac)) - torch.log1p(-torch.exp(ar)))
        return (-pc.sum() / nc.sum() - beta * F.logsigmoid(log_odds).mean()).item()
    return (-F.logsigmoid(beta * (ac - ar) - gamma)).mean().item()  # simpo


@pytest.fixture(scope="module")
def tiny_pairs_batch(tiny_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    config = load_config(None, [f"model={tiny_dir}", "task=dpo", "data.files=[unused.json]", "data.format=alpaca"])
    rows = Dataset.from_dict({"system": ["", "要简短。"], "turns": [["天空为什么是蓝色的？"], ["一加一", "二", "再加一呢？"]],
                              "chosen": ["因为散射。", "三"], "rejected": ["不知道。", "四吧"], "problem": ["", ""]})
    features = list(encode_pairs(rows, tokenizer, max_seq_len=64))
    model = Dpo(config).load_model(tiny_dir, torch.float32, "eager")
    batch = PreferenceCollator(GlmCollator.for_model(tokenizer.pad_token_id, model.config))(features)
    return model, batch


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_each_loss_equals_the_one_computed_by_hand(tiny_pairs_batch, tmp_path, loss_type):
    """The trainer's loss of a batch of two pairs (LoRA: the reference is the base with the adapter off) against
    the formula computed from the log-softmax of the full logits."""
    base, batch = tiny_pairs_batch
    reference, tokens = explicit_logps(base, batch)
    torch.manual_seed(0)
    policy_model = get_peft_model(base, LoraConfig(r=4, target_modules=["query_key_value", "dense_h_to_4h"],
                                                   init_lora_weights=False))  # random B: a policy away from the base
    try:
        policy, _ = explicit_logps(policy_model, batch)
        assert not torch.allclose(policy, reference)
        settings = DpoSettings(beta=0.3, loss_type=loss_type, simpo_gamma=0.4)
        args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], per_device_eval_batch_size=2)
        trainer = PreferenceTrainer(model=policy_model, args=args, preference=settings)
        policy_model.eval()
        with torch.no_grad():
            loss = trainer.compute_loss(policy_model, batch)
        expected = hand_loss(loss_type, 0.3, 0.4, policy, reference, tokens)
        assert loss.item() == pytest.approx(expected, rel=1e-4, abs=1e-6)
        assert trainer.reference == ("adapter off" if loss_type in ("sigmoid", "ipo") else None)
    finally:
        policy_model.unload()  # the module-scoped base model without the adapter for the next loss type


# ---- learning a preference -----------------------------------------------------------------------------------------
def sequence_logp(model, tokenizer, prompt: str, answer: str) -> float:
    """log p(answer <eop> | prompt [gMASK] <sop>), from the full logits."""
    prompt_ids, answer_ids = tokenizer.encode_text([prompt, answer])
    ids = [*prompt_ids, tokenizer.gmask_token_id, tokenizer.bos_token_id, *answer_ids, tokenizer.eos_token_id]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    per_token = torch.log_softmax(logits[:-1], dim=-1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
    return per_token[len(prompt_ids) + 1:].sum().item()


def test_a_tiny_model_learns_a_surface_preference_and_carries_it_to_held_out_pairs(tmp_path, tiny_dir):
    train = write_json(tmp_path / "train.json", surface_pairs(INSTRUCTIONS[:120]))
    held_out = surface_pairs(INSTRUCTIONS[150:190])
    config = dpo_config(tmp_path, tiny_dir, [train], max_steps=30, batch_size=8, logging_steps=5, save_steps=0,
                        report_to=["tensorboard"], data={"eval_files": [str(write_json(tmp_path / "dev.json",
                                                                                      held_out[:8]))]})
    assert main(["train", str(config)]) == 0
    out = tmp_path / "out"
    metrics = json.loads((out / "metrics.json").read_text())
    assert "perplexity" not in metrics and metrics["eval_rewards/accuracies"] >= 0.9
    for name in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                 "logps/rejected"):
        assert math.isfinite(metrics[name]) and math.isfinite(metrics[f"eval_{name}"])
    assert metrics["eval_rewards/margins"] > 0 and metrics["rewards/chosen"] > metrics["rewards/rejected"]
    assert list((out / "runs").rglob("events.out.tfevents.*"))
    height, width, _ = matplotlib.image.imread(out / "loss.png").shape
    assert width > 1.5 * height  # the loss, and beside it the reward accuracy and margin (reporting.plot_losses)
    log = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert not any("eval_perplexity" in entry for entry in log)

    # The reward of each held-out pair from the saved adapter: log-ratios of the tuned model against the base.
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    prompts = [build_prompt(row["instruction"]) for row in held_out]
    before = [(sequence_logp(base, tokenizer, p, row["chosen"]), sequence_logp(base, tokenizer, p, row["rejected"]))
              for p, row in zip(prompts, held_out)]
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32), out).eval()
    right = sum(
        sequence_logp(tuned, tokenizer, p, row["chosen"]) - chosen_base
        > sequence_logp(tuned, tokenizer, p, row["rejected"]) - rejected_base
        for p, row, (chosen_base, rejected_base) in zip(prompts, held_out, before)
    )
    assert right / len(held_out) >= 0.9, right


def test_sharegpt_ranking_rows_train_and_full_fine_tuning_uses_precomputed_reference(tmp_path, tiny_dir, caplog):
    """sharegpt ranking rows (LLaMA-Factory: the dialogue up to the question, one message each answer) with
    `method: full`, whose reference log-probs are computed once before training."""
    rows = [{"conversations": [{"from": "human", "value": row["instruction"]}],
             "chosen": {"from": "gpt", "value": pair["chosen"]}, "rejected": {"from": "gpt", "value": pair["rejected"]}}
            for row, pair in zip(INSTRUCTIONS[:16], surface_pairs(INSTRUCTIONS[:16]))]
    data = write_json(tmp_path / "pairs.jsonl", rows, lines=True)
    config = dpo_config(tmp_path, tiny_dir, [data], method="full", learning_rate=1e-3, data={"format": "sharegpt"})
    with caplog.at_level(logging.INFO, logger="thuglm.train"):
        assert main(["train", str(config)]) == 0
    assert "reference log-probs of the 16 training pairs computed" in caplog.text
    losses = loss_history(tmp_path / "out")
    assert losses[1] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at the first step
    assert losses[4] < losses[1]


# ---- bad rows, refused configs -------------------------------------------------------------------------------------
BAD_PAIRS = [
    {"instruction": "一加一", "chosen": "二", "rejected": "三"},
    {"instruction": "二加二", "chosen": "四", "rejected": "四"},
    {"instruction": "三加三", "chosen": "六", "rejected": ""},
    {"instruction": "四加四", "chosen": "八"},
    {"instruction": "五加五", "chosen": "十", "rejected": "十一"},
]


def test_bad_pairs_are_skipped_counted_and_named_or_stop_the_run(tmp_path, tiny_dir, capsys, caplog):
    data = write_json(tmp_path / "pairs.json", BAD_PAIRS)
    config = dpo_config(tmp_path, tiny_dir, [data], max_steps=1)
    with caplog.at_level(logging.WARNING, logger="thuglm.data"):
        assert main(["train", str(config)]) == 0
    assert "skipped 1 row(s) whose `chosen` and `rejected` are the same answer (row 2)" in caplog.text
    assert "skipped 2 row(s) whose `rejected` is empty (no rejected answer) (rows 3, 4)" in caplog.text
    assert "skipped 3 of 5 rows in all" in caplog.text
    capsys.readouterr()
    refused(capsys, main(["train", str(config), "data.on_bad_row=error", f"output_dir={tmp_path / 'out2'}"]),
            tmp_path / "out2", "pairs.json", "row 2", "are the same answer")


def test_ranking_keys_and_what_dpo_cannot_do_are_refused_with_the_fix(tmp_path, tiny_dir, capsys):
    data = write_json(tmp_path / "pairs.json", BAD_PAIRS)
    config = dpo_config(tmp_path, tiny_dir, [data])
    out = tmp_path / "never"
    cases = [
        (["task=causal_lm", "data.columns.chosen=better"], "`data.columns.chosen` names an answer of a ranking"),
        (["data.format=text"], "set data.format to alpaca"),
        (["method=ptuning"], "use method: lora"),
        (["packing=true"], "set `packing: false`"),
        (["dpo.loss_type=kto"], "config key `dpo.loss_type` must be one of sigmoid, ipo, orpo, simpo"),
    ]
    for overrides, fragment in cases:
        refused(capsys, main(["train", str(config), f"output_dir={out}", *overrides]), out, fragment)


# ---- resume, two processes -----------------------------------------------------------------------------------------
def test_a_resumed_run_takes_the_steps_of_an_uninterrupted_one(tmp_path, tiny_dir):
    data = write_json(tmp_path / "pairs.json", surface_pairs(INSTRUCTIONS[:32]))
    # A constant learning rate: the run cut at step 2 then schedules the same rates as the whole run.
    config = dpo_config(tmp_path, tiny_dir, [data], max_steps=4, save_steps=2, lr_scheduler="constant")
    whole = tmp_path / "whole"
    assert main(["train", str(config), f"output_dir={whole}"]) == 0
    part = tmp_path / "part"
    assert main(["train", str(config), f"output_dir={part}", "max_steps=2"]) == 0
    assert (part / "checkpoint-2").is_dir()
    assert main(["train", str(config), f"output_dir={part}", "resume_from_checkpoint=true"]) == 0
    expected, got = loss_history(whole), loss_history(part)
    assert sorted(got) == [1, 2, 3, 4]
    for step in (3, 4):
        assert got[step] == pytest.approx(expected[step], rel=1e-4), (got, expected)
    metrics = json.loads((part / "metrics.json").read_text())
    assert metrics["steps"] == 4 and math.isfinite(metrics["rewards/accuracies"])


@pytest.mark.parametrize("method", ["lora", "full"])
def test_two_processes_train_like_one(tmp_path, tiny_dir, method):
    """LoRA (the reference: the adapter off, through DDP's wrapper) and full fine-tuning (each process computes the
    reference log-probs of the pairs before DDP wraps the model)."""
    data = write_json(tmp_path / "pairs.json", surface_pairs(INSTRUCTIONS[:32]))
    config = dpo_config(tmp_path, tiny_dir, [data], max_steps=3, batch_size=2, global_batch_size=4, method=method,
                        learning_rate=1e-2 if method == "lora" else 1e-3)
    two = tmp_path / "two"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    launched = subprocess.run([sys.executable, "-m", "thuglm", "train", "--nproc", "2", str(config),
                               f"output_dir={two}"], check=False, capture_output=True, text=True, timeout=300, env=env)
    assert launched.returncode == 0, launched.stderr[-3000:]
    one = tmp_path / "one"
    assert main(["train", str(config), f"output_dir={one}"]) == 0
    expected, got = loss_history(one), loss_history(two)
    assert sorted(got) == sorted(expected) == [1, 2, 3]
    assert got[1] == pytest.approx(math.log(2), abs=1e-5)  # before any update, policy and reference agree everywhere
    for step in (1, 2, 3):
        assert got[step] == pytest.approx(expected[step], rel=2e-2), (got, expected)
    metrics = json.loads((two / "metrics.json").read_text())
    assert metrics["processes"] == 2 and 0 <= metrics["rewards/accuracies"] <= 1


def test_qlora_with_checkpointing_compares_with_the_4bit_base(tmp_path, tiny_dir):
    """QLoRA (a 4-bit base) with gradient checkpointing: the reference is that base with the adapter off, so the first
    step, whose adapter is still zero, scores every pair log 2."""
    data = write_json(tmp_path / "pairs.json", surface_pairs(INSTRUCTIONS[:16]))
    config = dpo_config(tmp_path, tiny_dir, [data], max_steps=3, gradient_checkpointing=True,
                        quantization={"bits": 4})
    assert main(["train", str(config)]) == 0
    losses = loss_history(tmp_path / "out")
    assert losses[1] == pytest.approx(math.log(2), abs=1e-5) and all(math.isfinite(loss) for loss in losses.values())
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, tiny_dir, capsys, monkeypatch):
    """The third step's loss and rewards become NaN (as an fp16 overflow makes them)."""
    step = {"poisoned": False}
    original_step, original_loss = PreferenceTrainer.compute_loss, dpo.preference_loss

    def flagged(self, model, inputs, *args, **kwargs):
        step["poisoned"] = self.state.global_step == 2 and model.training
        return original_step(self, model, inputs, *args, **kwargs)

    def poisoned(*args, **kwargs):
        loss, chosen, rejected = original_loss(*args, **kwargs)
        nan = float("nan") if step["poisoned"] else 1.0
        return loss * nan, chosen * nan, rejected * nan

    monkeypatch.setattr(PreferenceTrainer, "compute_loss", flagged)
    monkeypatch.setattr(dpo, "preference_loss", poisoned)
    data = write_json(tmp_path / "pairs.json", surface_pairs(INSTRUCTIONS[:32]))
    config = dpo_config(tmp_path, tiny_dir, [data], max_steps=4, save_steps=2)
    assert main(["train", str(config)]) == 2
    [message] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("thuglm: ")]
    assert message.startswith("thuglm: step 3: the loss became nan") and "checkpoint-2" in message, message
    out = tmp_path / "out"
    assert sorted(path.name for path in out.glob("checkpoint-*")) == ["checkpoint-2"]
    assert not (out / "metrics.json").exists()

    skipping = tmp_path / "skipping"  # on_nan: skip: that step is left out, and its pairs out of the metrics
    assert main(["train", str(config), f"output_dir={skipping}", "on_nan=skip", "logging_steps=4"]) == 0
    metrics = json.loads((skipping / "metrics.json").read_text())
    assert metrics["skipped_nonfinite_steps"] == 1 and metrics["steps"] == 4
    assert all(math.isfinite(metrics[name]) for name in ("rewards/accuracies", "rewards/margins", "logps/chosen"))
