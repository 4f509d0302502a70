import json
import shutil

import pytest
import torch
from peft import PeftModel

from thuglm.cli import main
from thuglm.inference import ModelLoadError, load_for_inference
from thuglm.inference.loading import resolve_dtype
from thuglm.models.folders import BASE_CHANGES_FILE, recorded_base_changes


def logits(tokenizer, model, texts=("你好", "春天适合做什么？")):
    batch = tokenizer(list(texts), padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits


def test_base_loads_in_eval_mode_in_fp32_on_cpu(base_dir):
    tokenizer, model = load_for_inference(base_dir)
    assert not model.training and model.dtype == torch.float32 and model.device.type == "cpu"
    assert type(tokenizer).__name__ == "ChatGLMTokenizer"


def test_adapter_changes_the_outputs(base_dir, adapter_dir):
    tokenizer, base = load_for_inference(base_dir)
    _, adapted = load_for_inference(base_dir, adapter=adapter_dir)
    assert isinstance(adapted, PeftModel) and not adapted.training
    assert not torch.allclose(logits(tokenizer, base), logits(tokenizer, adapted), atol=1e-3)


def test_an_output_folder_loads_its_base_and_its_tokenizer(base_dir, adapter_dir, output_dir):
    tokenizer, from_output = load_for_inference(output_dir)
    _, explicit = load_for_inference(base_dir, adapter=adapter_dir)
    assert isinstance(from_output, PeftModel)
    assert tokenizer.name_or_path == str(output_dir)
    torch.testing.assert_close(logits(tokenizer, from_output), logits(tokenizer, explicit), rtol=0, atol=0)


def test_a_bare_adapter_takes_the_base_tokenizer(base_dir, adapter_dir):
    tokenizer, _ = load_for_inference(base_dir, adapter=adapter_dir)
    assert tokenizer.name_or_path == str(base_dir)


@pytest.mark.parametrize("name, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_dtype_names(name, dtype):
    assert resolve_dtype(name) is dtype


def test_auto_dtype_is_fp32_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert resolve_dtype("auto") is torch.float32
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        resolve_dtype("int8")


def copy_without(source, target, *names):
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(*names))
    return target


@pytest.mark.parametrize(
    "missing, message",
    [("config.json", "no config.json"), ("model.safetensors", "no weights"), ("ice_text.model", "no tokenizer")],
)
def test_an_incomplete_model_folder_says_what_is_missing(base_dir, tmp_path, missing, message):
    folder = copy_without(base_dir, tmp_path / "model", missing)
    with pytest.raises(ModelLoadError, match=message) as error:
        load_for_inference(folder)
    assert str(folder) in str(error.value)


def test_a_missing_folder_is_named(tmp_path):
    with pytest.raises(ModelLoadError, match="not a folder"):
        load_for_inference(tmp_path / "nowhere")


def test_an_adapter_folder_without_adapter_config(base_dir, adapter_dir, tmp_path):
    folder = copy_without(adapter_dir, tmp_path / "adapter", "adapter_config.json")
    with pytest.raises(ModelLoadError, match="no adapter_config.json") as error:
        load_for_inference(base_dir, adapter=folder)
    assert str(folder) in str(error.value)


def test_an_adapter_whose_base_is_gone_says_how_to_pass_it(adapter_dir, tmp_path):
    folder = shutil.copytree(adapter_dir, tmp_path / "adapter")
    config = json.loads((folder / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "deleted-base")
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="deleted-base.*not a folder here") as error:
        load_for_inference(folder)
    assert "load_for_inference(BASE_DIR, adapter=ADAPTER_DIR)" in str(error.value)  # Python's way, not a flag
    assert f"base_model_name_or_path in {folder / 'adapter_config.json'}" in str(error.value)


@pytest.mark.parametrize("command", ["eval", "serve"])
def test_a_command_names_the_base_in_its_own_terms(adapter_dir, tmp_path, capsys, command):
    folder = shutil.copytree(adapter_dir, tmp_path / "adapter")
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": ""}))
    arguments = ["--data", str(tmp_path / "unread.csv")] if command == "eval" else []
    assert main([command, str(folder), *arguments]) == 2
    refusal = capsys.readouterr().err
    assert f"thuglm {command} BASE_DIR --adapter {folder}" in refusal and "adapter=" not in refusal


def test_an_adapter_folder_as_model_and_another_adapter_is_refused(adapter_dir, output_dir):
    with pytest.raises(ModelLoadError, match="itself an adapter folder"):
        load_for_inference(output_dir, adapter=adapter_dir)


@pytest.mark.parametrize(
    ("changes", "message"),
    [({"max_sequence_length": 4096, "vocab_size": 10}, "changes vocab_size of the base's config"),
     ({"rope_parameters": {"rope_type": "yarn", "factor": 2}}, "rope_type 'yarn' is not one ChatGLM runs")],
)
def test_a_record_of_base_changes_thuglm_does_not_write_is_refused_with_the_file_named(tmp_path, changes, message):
    (tmp_path / BASE_CHANGES_FILE).write_text(json.dumps(changes))
    with pytest.raises(ModelLoadError, match=f"{BASE_CHANGES_FILE}.*{message}"):
        recorded_base_changes(tmp_path)


def test_a_record_of_base_changes_reads_in_transformers_form(tmp_path):
    (tmp_path / BASE_CHANGES_FILE).write_text(json.dumps(
        {"max_sequence_length": 8192, "rope_parameters": {"type": "linear", "factor": 4}}))
    assert recorded_base_changes(tmp_path) == {"max_sequence_length": 8192,
                                               "rope_parameters": {"rope_type": "linear", "factor": 4.0}}
    assert recorded_base_changes(tmp_path / "elsewhere") == {}
