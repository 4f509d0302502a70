"""The training config: YAML, dotted overrides, defaults, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from thuglm.data.samples import DEFAULT_MAX_SEQ_LEN
from thuglm.models import ChatGLMConfig
from thuglm.training.config import (
    DEFAULT_LORA_TARGETS,
    ConfigError,
    check_max_seq_len,
    load_config,
    long_context_kwargs,
    valid_keys,
)


def write(tmp_path, text: str):
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_minimal_config_gets_defaults(tmp_path):
    config = load_config(write(tmp_path, "model: tiny\ndata:\n  files: corpus/*.csv\n"))
    assert config.model == "tiny"
    assert config.data.files == ["corpus/*.csv"]  # one item becomes a list
    assert config.method == "lora"
    assert config.lora.target_modules == DEFAULT_LORA_TARGETS
    assert config.learning_rate == 2e-4 and config.packing is True  # filled in once, read as plain keys
    assert config.max_grad_norm == 1.0
    assert config.max_seq_len == DEFAULT_MAX_SEQ_LEN
    assert config.data.format == "text" and config.precision == "auto"


def test_every_key_named_by_the_issue_exists():
    keys = set(valid_keys(__import__("thuglm.training.config", fromlist=["TrainConfig"]).TrainConfig))
    wanted = """model method data.files data.format data.text_column max_seq_len packing max_steps epochs batch_size
        gradient_accumulation_steps learning_rate seed save_steps output_dir resume_from_checkpoint precision
        gradient_checkpointing lora.r lora.alpha lora.dropout lora.target_modules data.streaming data.eval_files
        data.validation_split data.num_proc data.encoding freeze.trainable_layers""".split()
    assert set(wanted) <= keys


def test_overrides_are_dotted_and_typed_by_yaml(tmp_path):
    path = write(tmp_path, "model: tiny\ndata: {files: [a.csv]}\n")
    config = load_config(
        path,
        ["data.text_column=sentence", "lora.r=16", "learning_rate=3e-4", "packing=false", "data.files=[x.csv, y.json]",
         "method=full", "resume_from_checkpoint=out/checkpoint-4"],
    )
    assert config.data.text_column == "sentence"
    assert config.lora.r == 16
    assert config.learning_rate == 3e-4
    assert config.packing is False
    assert config.data.files == ["x.csv", "y.json"]
    assert config.resume_from_checkpoint == "out/checkpoint-4"


def test_learning_rate_written_as_yaml_1_1_string_is_a_number(tmp_path):
    config = load_config(write(tmp_path, "model: tiny\ndata: {files: a.csv}\nlearning_rate: 1e-5\n"))
    assert config.learning_rate == 1e-5


@pytest.mark.parametrize(
    ("overrides", "learning_rate", "packing"),
    [
        ([], 2e-4, True),
        (["method=ptuning"], 2e-2, True),  # the official P-Tuning recipe's
        (["method=full"], 2e-5, True),
        (["method=freeze", "data.format=alpaca"], 2e-5, False),  # a sample an answer, each after its prompt
        (["data.files=[]", "data.sources=[{files: [a.csv]}, {files: [b.json], format: sharegpt}]"], 2e-4, False),
        (["task=seq_cls"], 2e-4, False),  # one sample a row
        (["learning_rate=1e-3", "packing=false"], 1e-3, False),  # given: kept
    ],
)
def test_defaults_that_depend_on_other_keys_are_filled_in_once(tmp_path, overrides, learning_rate, packing):
    config = load_config(write(tmp_path, "model: tiny\ndata: {files: [a.csv]}\n"), overrides)
    assert config.learning_rate == learning_rate and config.packing is packing
    assert config.to_dict()["learning_rate"] == learning_rate  # thuglm_train.yaml records what ran


def test_gradient_accumulation_comes_from_the_global_batch_for_the_processes(tmp_path):
    path = write(tmp_path, "model: tiny\ndata: {files: [a.csv]}\nbatch_size: 4\n")
    assert load_config(path, ["gradient_accumulation_steps=3"]).gradient_accumulation_for(2) == 3
    config = load_config(path, ["global_batch_size=32"])
    assert [config.gradient_accumulation_for(processes) for processes in (1, 2, 8)] == [8, 4, 1]
    with pytest.raises(ConfigError, match=r"32 rows a step do not split over 3 process\(es\) x batch_size 4"):
        config.gradient_accumulation_for(3)


def test_max_seq_len_longer_than_the_model_was_trained_on_is_refused(tmp_path):
    path = write(tmp_path, "model: tiny\ndata: {files: [a.csv]}\n")
    chatglm_6b = ChatGLMConfig()  # max_sequence_length 2048, as the official config.json
    check_max_seq_len(load_config(path, ["max_seq_len=2048"]), chatglm_6b)
    check_max_seq_len(load_config(path), chatglm_6b)
    with pytest.raises(ConfigError) as error:
        check_max_seq_len(load_config(path, ["max_seq_len=4096"]), chatglm_6b)
    message = str(error.value)
    assert "`max_seq_len` is 4096" in message and "at most 2048 tokens" in message
    assert "set max_seq_len to 2048 or less" in message and "or add `rope_scaling: linear`" in message
    with pytest.raises(ConfigError, match="`max_seq_len` is 512.*at most 256 tokens"):
        check_max_seq_len(load_config(path), ChatGLMConfig(max_sequence_length=256))


def test_rope_scaling_stretches_the_context_to_max_seq_len_and_is_refused_with_nothing_to_stretch(tmp_path):
    path = write(tmp_path, "model: tiny\ndata: {files: [a.csv]}\n")
    chatglm_6b = ChatGLMConfig()
    longer = load_config(path, ["max_seq_len=16384", "rope_scaling=linear"])
    check_max_seq_len(longer, chatglm_6b)
    assert long_context_kwargs(longer, chatglm_6b) == {
        "max_sequence_length": 16384, "rope_parameters": {"rope_type": "linear", "factor": 8.0}}
    # A base stretched before (a merged long-context model) is stretched further: the factors multiply.
    stretched = ChatGLMConfig(max_sequence_length=4096, rope_parameters={"rope_type": "linear", "factor": 2})
    assert long_context_kwargs(longer, stretched)["rope_parameters"]["factor"] == 8.0
    assert long_context_kwargs(load_config(path), chatglm_6b) == {}  # without rope_scaling nothing changes
    check_max_seq_len(load_config(path, ["max_seq_len=4096"]), stretched)  # within its stretched context
    with pytest.raises(ConfigError) as error:
        check_max_seq_len(load_config(path, ["max_seq_len=1024", "rope_scaling=linear"]), chatglm_6b)
    assert "max_seq_len 1024 is within them: remove rope_scaling, or raise max_seq_len above 2048" in str(error.value)
    with pytest.raises(ConfigError, match="rope_scaling.*must be one of linear"):
        load_config(path, ["rope_scaling=dynamic"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("lerning_rate=1e-4", "unknown config key `lerning_rate`. Did you mean `learning_rate`?"),
        ("data.text_colum=x", "Did you mean `data.text_column`?"),
        ("lora.rank=4", "unknown config key `lora.rank`"),
        ("method=lorra", "must be one of lora, full, freeze, ptuning; got 'lorra' (did you mean `lora`?)"),
        ("batch_size=four", "`batch_size` must be an integer or auto; got 'four'"),
        ("gradient_checkpointing=maybe", "`gradient_checkpointing` must be true or false"),
        ("batch_size=0", "`batch_size` must be at least 1"),
        ("save_steps=-1", "`save_steps` must be at least 0 (0: no checkpoints)"),
        ("eval_steps=0", "`eval_steps` must be at least 1"),
        ("data.validation_split=1.5", "data.validation_split"),
        ("data.streaming=true", "needs `max_steps`"),
        ("notakey", "must look like key=value"),
        ("lora=3", "`lora` is a section"),
    ],
)
def test_bad_keys_and_values_are_named(tmp_path, override, message):
    path = write(tmp_path, "model: tiny\ndata: {files: [a.csv]}\n")
    with pytest.raises(ConfigError) as error:
        load_config(path, [override])
    assert message in str(error.value)


def test_model_and_data_are_required(tmp_path):
    with pytest.raises(ConfigError, match="`model` is required"):
        load_config(write(tmp_path, "data: {files: a.csv}\n"))
    with pytest.raises(ConfigError, match="`data.files` is required"):
        load_config(write(tmp_path, "model: tiny\n"))


def test_unreadable_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "model: [tiny\n"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))


@pytest.mark.parametrize("path", sorted(Path(__file__).parents[2].glob("configs/*.yaml")), ids=lambda p: p.name)
def test_shipped_example_configs_load(path):
    config = load_config(path)
    assert config.model and (config.data.files or config.data.sources)


@pytest.mark.parametrize("name", ["demo_pretrain.yaml", "demo_lora.yaml"])
def test_demo_configs_load(name):
    from thuglm.training.demo import resource_path

    config = load_config(resource_path("configs", name), ["model=tiny", "data.files=x"])
    assert config.precision == "fp32"


@pytest.mark.parametrize("sharding", [None, "FSDP"])
def test_checkpointing_is_reentrant_unless_sharded_and_set_without_deprecated_names(tmp_path, monkeypatch, sharding):
    """The Trainer gets torch's reentrant checkpoint (its first forward builds no graph: less host work a step), FSDP /
    DeepSpeed the non-reentrant one; under the names the installed transformers has, so no deprecation warning."""
    import warnings

    from thuglm.training import activation_checkpointing
    from thuglm.training.recipe import training_arguments

    monkeypatch.setattr(activation_checkpointing, "sharding_plugin", lambda: sharding)
    config = load_config(write(tmp_path, f"model: tiny\ndata:\n  files: x.csv\noutput_dir: {tmp_path / 'out'}\n"
                                         "gradient_checkpointing: true\n"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        args = training_arguments(config, "fp32", has_eval=False)
    assert args.gradient_checkpointing is True  # the old name mirrors the new one where transformers renamed it
    assert args.gradient_checkpointing_kwargs == {"use_reentrant": sharding is None}


def test_enable_checkpointing_turns_it_on_once_through_a_peft_wrapper(tiny_dir):
    """What batch_size: auto calls before probing, on the model inside peft, under either transformers' names."""
    import warnings

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from thuglm.training.activation_checkpointing import enable_checkpointing

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    wrapped = get_peft_model(model, LoraConfig(r=2, target_modules=["dense"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        enable_checkpointing(wrapped)
        enable_checkpointing(wrapped)  # already on: left as it is
    assert all(layer.gradient_checkpointing for layer in model.transformer.layers)
