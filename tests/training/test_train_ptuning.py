"""`thuglm train` with `method: ptuning`: the official layout out, the official recipe reads it, resume, chat."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoTokenizer

import thuglm  # noqa: F401
from thuglm.cli import main
from thuglm.inference.loading import load_for_inference
from thuglm.models.prefix import PREFIX_KEY, is_ptuning_folder

from .test_resume import loss_history
from .test_train_e2e import OFFICIAL_TINY, assert_common_outputs, assert_losses_fall, base_settings, write_config

PRE_SEQ_LEN = 4
STEPS = 12  # four prefix slots learn slowly: over 8 steps the noise of which rows a batch drew can hide the fall


@pytest.fixture(scope="module")
def ptuning_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("ptuning")
    settings = base_settings(tmp_path, method="ptuning", learning_rate=3e-2, max_steps=STEPS,
                             ptuning={"pre_seq_len": PRE_SEQ_LEN, "prefix_projection": False})
    assert main(["train", str(write_config(tmp_path, **settings))]) == 0
    return tmp_path


def official_recipe(checkpoint):
    """ptuning/README.md's loading code, as written there (no trust_remote_code: thuglm registers ChatGLM)."""
    config = AutoConfig.from_pretrained(OFFICIAL_TINY, pre_seq_len=PRE_SEQ_LEN)
    model = AutoModel.from_pretrained(OFFICIAL_TINY, config=config)
    prefix_state_dict = torch.load(checkpoint / "pytorch_model.bin")
    new_prefix_state_dict = {}
    for k, v in prefix_state_dict.items():
        if k.startswith("transformer.prefix_encoder."):
            new_prefix_state_dict[k[len("transformer.prefix_encoder."):]] = v
    model.transformer.prefix_encoder.load_state_dict(new_prefix_state_dict)
    return model.eval()


def test_ptuning_run_writes_the_official_layout_and_the_loss_falls(ptuning_run):
    output_dir = ptuning_run / "out"
    for folder in (output_dir, output_dir / "checkpoint-4", output_dir / "checkpoint-8"):
        assert is_ptuning_folder(folder), folder
        state = torch.load(folder / "pytorch_model.bin", weights_only=True)
        assert set(state) == {f"{PREFIX_KEY}embedding.weight"}
        assert state[f"{PREFIX_KEY}embedding.weight"].dtype == torch.float32
        config = json.loads((folder / "config.json").read_text())
        assert config["pre_seq_len"] == PRE_SEQ_LEN and config["prefix_projection"] is False
    assert not (output_dir / "model.safetensors").exists() and not (output_dir / "adapter_config.json").exists()
    metrics = assert_common_outputs(output_dir, "ptuning", steps=STEPS)
    trainable = 2 * 2 * 64 * PRE_SEQ_LEN  # 2 layers x key and value x hidden 64, per slot
    assert metrics["trainable_parameters"] == trainable
    assert_losses_fall(output_dir)


def test_the_official_recipe_and_thuglm_load_the_same_trained_model(ptuning_run):
    output_dir = ptuning_run / "out"
    official = official_recipe(output_dir)
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    batch = tokenizer(["春天来了，", "长城是"], return_tensors="pt", padding=True)
    _, loaded = load_for_inference(OFFICIAL_TINY, adapter=output_dir, dtype="fp32", device="cpu")
    _, alone = load_for_inference(output_dir, dtype="fp32", device="cpu")  # the base recorded in config.json
    base = AutoModel.from_pretrained(OFFICIAL_TINY).eval()
    with torch.no_grad():
        expected = official(**batch).logits
        torch.testing.assert_close(loaded(**batch).logits, expected)
        torch.testing.assert_close(alone(**batch).logits, expected)
        assert (base(**batch).logits - expected).abs().max() > 1e-3  # the prefix changed the model


def test_generate_command_takes_a_ptuning_folder(ptuning_run, tmp_path):
    output_dir = ptuning_run / "out"
    (tmp_path / "prompts.txt").write_text("你好\n长城是\n", encoding="utf-8")
    out = tmp_path / "answers.jsonl"
    assert main(["generate", str(OFFICIAL_TINY), "--adapter", str(output_dir), "--input", str(tmp_path / "prompts.txt"),
                 "--output", str(out), "--max-new-tokens", "4", "--dtype", "fp32"]) == 0
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [row["prompt"] for row in rows] == ["你好", "长城是"]


def test_resume_continues_the_ptuning_run_exactly(ptuning_run, tmp_path):
    """The run's checkpoint-4 (prefix, optimizer, data position), resumed elsewhere: the run's losses of steps 5-12."""
    settings = base_settings(tmp_path, method="ptuning", learning_rate=3e-2, max_steps=STEPS,
                             ptuning={"pre_seq_len": PRE_SEQ_LEN, "prefix_projection": False})
    shutil.copytree(ptuning_run / "out" / "checkpoint-4", tmp_path / "out" / "checkpoint-4")
    assert main(["train", str(write_config(tmp_path, **settings)), "resume_from_checkpoint=true"]) == 0
    resumed, reference = loss_history(tmp_path / "out"), loss_history(ptuning_run / "out")
    assert sorted(resumed) == sorted(reference) == list(range(1, STEPS + 1))
    for step in resumed:
        assert resumed[step] == pytest.approx(reference[step], rel=1e-4), step


def test_ptuning_refuses_a_classification_task(tmp_path, capsys):
    settings = base_settings(tmp_path, method="ptuning", task="seq_cls")
    assert main(["train", str(write_config(tmp_path, **settings))]) == 2
    assert "method: ptuning" in capsys.readouterr().err


def test_ptuning_on_a_4bit_base_trains_the_prefix_and_loads_quantized_again(tmp_path):
    """The official recipe's setting (quantization_bit=4 with P-Tuning v2), through bitsandbytes: the base in 4 bits,
    the prefix in fp32 and saved in the official layout; it runs again on a 4-bit base."""
    pytest.importorskip("bitsandbytes")
    settings = base_settings(tmp_path, method="ptuning", learning_rate=3e-2, quantization={"bits": 4},
                             gradient_checkpointing=True, max_steps=4, save_steps=2, report_to=[],
                             ptuning={"pre_seq_len": PRE_SEQ_LEN, "prefix_projection": True})
    # No evaluation between steps: on the CPU, bitsandbytes repacks 4-bit weights for inference the first time they
    # run without gradients, and its repacked matmul then fails under autograd (CPU only; CUDA never repacks).
    settings.pop("eval_steps")
    settings["data"]["validation_split"] = 0.0
    assert main(["train", str(write_config(tmp_path, **settings))]) == 0
    output_dir = tmp_path / "out"
    assert is_ptuning_folder(output_dir) and is_ptuning_folder(output_dir / "checkpoint-2")
    state = torch.load(output_dir / "pytorch_model.bin", weights_only=True)
    assert {key.split(".")[2] for key in state} == {"embedding", "trans"}
    assert all(value.dtype == torch.float32 for value in state.values())
    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert math.isfinite(metrics["final_train_loss"]) and metrics["steps"] == 4
    _, model = load_for_inference(OFFICIAL_TINY, adapter=output_dir, dtype="fp32", device="cpu", quantize=4)
    assert model.transformer.prefix_encoder.trans[0].weight.dtype == torch.float32  # not quantized
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    with torch.no_grad():
        assert torch.isfinite(model(**tokenizer(["你好"], return_tensors="pt")).logits).all()


def test_two_processes_train_the_prefix_like_one(tmp_path):
    """DDP (torchrun, gloo on CPU): the prefix's run in 2 processes is the run of one with the same global batch."""
    from .test_distributed import run_two_processes

    values = base_settings(tmp_path, method="ptuning", learning_rate=3e-2, max_steps=4, batch_size=2,
                           global_batch_size=4, save_steps=2, report_to=[],
                           ptuning={"pre_seq_len": PRE_SEQ_LEN, "dropout": 0.0})
    values["data"]["validation_split"] = 0.0
    two = tmp_path / "two"
    config = write_config(tmp_path, **{**values, "output_dir": str(two)})
    launched = run_two_processes(config)
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert is_ptuning_folder(two) and is_ptuning_folder(two / "checkpoint-2")
    one = tmp_path / "one"
    assert main(["train", str(config), f"output_dir={one}"]) == 0
    got, expected = loss_history(two), loss_history(one)
    assert sorted(got) == sorted(expected) == [1, 2, 3, 4]
    for step in got:
        assert got[step] == pytest.approx(expected[step], rel=2e-2), step


def test_merge_refuses_a_prefix_with_the_reason(ptuning_run, tmp_path, capsys):
    assert main(["merge", "--base", str(OFFICIAL_TINY), "--adapter", str(ptuning_run / "out"),
                 "--out", str(tmp_path / "merged")]) == 2
    assert "nothing to merge" in capsys.readouterr().err


def test_a_safetensors_prefix_folder_loads_too(ptuning_run, tmp_path):
    """The official code under a transformers that saves safetensors writes model.safetensors instead."""
    from safetensors.torch import save_file

    folder = tmp_path / "st"
    folder.mkdir()
    shutil.copy(ptuning_run / "out" / "config.json", folder / "config.json")
    save_file(torch.load(ptuning_run / "out" / "pytorch_model.bin", weights_only=True), str(folder / "model.safetensors"))
    assert is_ptuning_folder(folder)
    _, from_bin = load_for_inference(OFFICIAL_TINY, adapter=ptuning_run / "out", dtype="fp32", device="cpu")
    _, from_st = load_for_inference(OFFICIAL_TINY, adapter=folder, dtype="fp32", device="cpu")
    ids = torch.tensor([[5, 6, 9]])
    with torch.no_grad():
        torch.testing.assert_close(from_st(input_ids=ids).logits, from_bin(input_ids=ids).logits)


def test_a_prefix_folder_is_refused_as_a_training_base(ptuning_run, tmp_path, capsys):
    """Loaded as a model, a prefix folder would give a model of random base weights: named and refused."""
    settings = base_settings(tmp_path, method="lora", model=str(ptuning_run / "out"))
    assert main(["train", str(write_config(tmp_path, **settings))]) == 2
    assert "P-Tuning v2 checkpoint" in capsys.readouterr().err


def test_a_ptuning_prefix_trained_past_the_context_loads_on_the_stretched_base(tmp_path):
    settings = base_settings(tmp_path, method="ptuning", max_seq_len=1024, rope_scaling="linear", batch_size=1,
                             max_steps=1, save_steps=0, ptuning={"pre_seq_len": PRE_SEQ_LEN})
    settings["data"]["validation_split"] = 0
    assert main(["train", str(write_config(tmp_path, **settings))]) == 0
    _, model = load_for_inference(tmp_path / "out", dtype="fp32", device="cpu")
    assert model.config.max_sequence_length == 1024 and model.config.rope_factor == 2.0
    assert model.transformer.prefix_encoder is not None
