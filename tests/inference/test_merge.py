import json
import os
import stat

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from thuglm.cli import main
from thuglm.inference import ModelLoadError, load_for_inference, merge_adapter

TEXTS = ["你好", "春天适合做什么？", "床前明月光，疑是地上霜。"]


def logits(tokenizer, model):
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits


@pytest.fixture(scope="module")
def merged_dir(base_dir, adapter_dir, tmp_path_factory):
    return merge_adapter(base_dir, adapter_dir, tmp_path_factory.mktemp("merge") / "merged")


def test_merged_model_loads_standalone_and_equals_base_plus_adapter(merged_dir, base_dir, adapter_dir):
    tokenizer, adapted = load_for_inference(base_dir, adapter=adapter_dir)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    assert type(merged).__name__ == "ChatGLMForConditionalGeneration"
    torch.testing.assert_close(logits(tokenizer, merged), logits(tokenizer, adapted), rtol=0, atol=1e-4)


def test_merged_folder_holds_safetensors_and_the_tokenizer(merged_dir):
    names = {path.name for path in merged_dir.iterdir()}
    assert {"config.json", "model.safetensors", "ice_text.model", "tokenizer_config.json"} <= names
    assert not any(name.startswith("adapter") for name in names)
    assert type(AutoTokenizer.from_pretrained(merged_dir)).__name__ == "ChatGLMTokenizer"
    assert not [path for path in merged_dir.parent.iterdir() if path != merged_dir]  # no staging folder left


def test_the_base_defaults_to_the_one_recorded_in_the_adapter(output_dir, merged_dir, tmp_path):
    out = merge_adapter(None, output_dir, tmp_path / "merged")
    first = AutoModelForCausalLM.from_pretrained(merged_dir).state_dict()
    second = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_a_non_empty_out_dir_is_refused_unless_overwrite(base_dir, adapter_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(ModelLoadError, match=r"not empty.*overwrite=True"):
        merge_adapter(base_dir, adapter_dir, out)
    assert (out / "notes.txt").read_text() == "keep me"
    merge_adapter(base_dir, adapter_dir, out, overwrite=True)
    assert (out / "model.safetensors").is_file() and not (out / "notes.txt").exists()


def test_the_base_or_adapter_folder_is_never_the_out_dir(base_dir, adapter_dir):
    with pytest.raises(ModelLoadError, match="which the merge reads"):
        merge_adapter(base_dir, adapter_dir, base_dir, overwrite=True)


def test_a_failed_merge_leaves_nothing_behind(base_dir, adapter_dir, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("transformers.PreTrainedModel.save_pretrained", fail)
    with pytest.raises(OSError, match="disk full"):
        merge_adapter(base_dir, adapter_dir, tmp_path / "merged")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_the_merged_folder_follows_the_umask(base_dir, adapter_dir, tmp_path, umask):
    previous = os.umask(umask)
    try:
        out = merge_adapter(base_dir, adapter_dir, tmp_path / "merged")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask  # not tempfile.mkdtemp's 0700
    assert stat.S_IMODE((out / "model.safetensors").stat().st_mode) == 0o666 & ~umask


def test_the_merge_command_names_its_own_flags(base_dir, adapter_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert main(["merge", "--base", str(base_dir), "--adapter", str(adapter_dir), "--out", str(out)]) == 2
    refusal = capsys.readouterr().err
    assert "not empty" in refusal and "--overwrite" in refusal and "overwrite=True" not in refusal

    moved = tmp_path / "adapter"  # an adapter whose recorded base is gone: the fix is merge's --base
    moved.mkdir()
    for source in adapter_dir.iterdir():
        (moved / source.name).write_bytes(source.read_bytes())
    config = json.loads((moved / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "gone")
    (moved / "adapter_config.json").write_text(json.dumps(config))
    assert main(["merge", "--adapter", str(moved), "--out", str(tmp_path / "merged")]) == 2
    refusal = capsys.readouterr().err
    assert "--base BASE_DIR" in refusal and "base_model_name_or_path" in refusal and "adapter=" not in refusal
