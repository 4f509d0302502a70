"""`thuglm predict`: full and LoRA classifier folders, batching and padding, output rows, errors."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import transformers
from peft import LoraConfig, TaskType, get_peft_model
from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification, AutoTokenizer

import thuglm  # noqa: F401
from thuglm.cli import main
from thuglm.data.classification import align_tokens, token_tags
from thuglm.inference.loading import ModelLoadError
from thuglm.inference.predict import load_classifier_for_inference, predict_file
from thuglm.training.tasks.classification import save_classifier_config

from ..conftest import random_weights

OFFICIAL_TINY = Path(__file__).parents[1] / "fixtures" / "official_tiny"
TEXTS = ["北京是中国的首都", "你好", "春眠不觉晓，处处闻啼鸟。", "今天天气很好", "我爱北京天安门"]
TOPICS = {0: "体育", 1: "天气", 2: "饮食"}
TAGS = {0: "O", 1: "B-LOC", 2: "I-LOC"}


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(OFFICIAL_TINY)


def labelled(auto_class, names: dict[int, str], seed: int):
    model = auto_class.from_pretrained(OFFICIAL_TINY, id2label=names, label2id={v: k for k, v in names.items()})
    return random_weights(model, seed=seed).eval()


@pytest.fixture(scope="module")
def full_classifier(tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("full") / "model"
    model = labelled(AutoModelForSequenceClassification, TOPICS, seed=5)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, model


@pytest.fixture(scope="module")
def lora_tagger(tokenizer, tmp_path_factory):
    """What `thuglm train` with task token_cls and method lora leaves: adapter + head, config.json, tokenizer."""
    path = tmp_path_factory.mktemp("lora") / "out"
    base = labelled(AutoModelForTokenClassification, TAGS, seed=6)
    base.save_pretrained(path.parent / "base")  # the base the adapter names; its head is replaced by the adapter's
    config = LoraConfig(task_type=TaskType.TOKEN_CLS, r=4, target_modules=["query_key_value"], init_lora_weights=False,
                        modules_to_save=["score"])
    base = AutoModelForTokenClassification.from_pretrained(path.parent / "base")
    model = get_peft_model(base, config)
    torch.nn.init.normal_(model.base_model.model.score.modules_to_save["default"].weight, std=1.0)
    model.save_pretrained(path)
    save_classifier_config(model, path)
    tokenizer.save_pretrained(path)
    return path, model.eval()


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_full_classifier_predicts_each_row_as_alone(full_classifier, tokenizer, tmp_path):
    folder, model = full_classifier
    data = write_rows(tmp_path / "texts.jsonl", [{"id": i, "text": text} for i, text in enumerate(TEXTS)])
    assert main(["predict", str(folder), str(data), "--batch-size", "2"]) == 0
    rows = read_rows(tmp_path / "texts.predictions.jsonl")  # the default output: next to the input
    assert [row["id"] for row in rows] == list(range(len(TEXTS)))  # input order, columns kept
    for row, text in zip(rows, TEXTS):
        with torch.no_grad():
            probabilities = model(**tokenizer([text], return_tensors="pt")).logits[0].softmax(-1)
        assert row["predicted_label"] == TOPICS[int(probabilities.argmax())]
        assert row["probability"] == pytest.approx(float(probabilities.max()), abs=1e-5)


def test_lora_output_folder_predicts_tags_per_character(lora_tagger, tokenizer, tmp_path):
    folder, model = lora_tagger
    data = write_rows(tmp_path / "texts.jsonl", [{"sentence": text} for text in TEXTS])
    output = tmp_path / "tags.jsonl"
    assert main(["predict", str(folder), str(data), "--output", str(output), "--text-column", "sentence"]) == 0
    rows = read_rows(output)
    for row, text in zip(rows, TEXTS):
        assert row["tokens"] == list(text) and len(row["predicted_tags"]) == len(text)
        alignment = align_tokens(tokenizer, list(text), 512)
        with torch.no_grad():
            logits = model(**tokenizer.pad({"input_ids": [alignment.input_ids]}, return_tensors="pt")).logits[0]
        pieces = [TAGS[int(i)] if token is not None else None
                  for i, token in zip(logits.argmax(-1), alignment.piece_token)]
        assert row["predicted_tags"] == token_tags(alignment, pieces)
        for entity in row["entities"]:
            assert entity["text"] == text[entity["start"] : entity["end"]]
    assert any(tag != "O" for row in rows for tag in row["predicted_tags"])  # the random head predicts entities too


def test_adapter_and_head_come_back_from_the_output_folder(lora_tagger):
    folder, model = lora_tagger
    _, loaded, task = load_classifier_for_inference(folder, dtype="fp32", device="cpu")
    assert task == "token_cls" and loaded.config.id2label == TAGS
    trained = model.base_model.model.score.modules_to_save["default"].weight
    assert torch.equal(loaded.base_model.model.score.modules_to_save["default"].weight, trained)


def test_predict_refuses_what_is_not_a_classifier(lora_tagger, tmp_path):
    data = write_rows(tmp_path / "texts.jsonl", [{"text": "你好"}])
    with pytest.raises(ModelLoadError, match="not a classifier"):
        predict_file(OFFICIAL_TINY, data)
    bare_adapter = tmp_path / "adapter"
    bare_adapter.mkdir()
    folder, _ = lora_tagger
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (bare_adapter / name).write_bytes((folder / name).read_bytes())
    with pytest.raises(ModelLoadError, match="without a config.json"):
        predict_file(bare_adapter, data)


@pytest.fixture(scope="module")
def lora_classifier_on_language_model(tmp_path_factory):
    """What `thuglm train` with task seq_cls and method lora leaves: the base it names is the language model, which
    has no `score` head; the trained head is in the adapter (modules_to_save)."""
    path = tmp_path_factory.mktemp("lora_seq") / "out"
    base = AutoModelForSequenceClassification.from_pretrained(
        OFFICIAL_TINY, id2label=TOPICS, label2id={name: index for index, name in TOPICS.items()}
    )
    config = LoraConfig(task_type=TaskType.SEQ_CLS, r=4, target_modules=["query_key_value"], init_lora_weights=False,
                        modules_to_save=["score"])
    model = get_peft_model(base, config)
    model.save_pretrained(path)
    save_classifier_config(model, path)
    AutoTokenizer.from_pretrained(OFFICIAL_TINY).save_pretrained(path)
    return path


def test_predict_shows_no_load_report_for_the_head_the_adapter_brings(lora_classifier_on_language_model, tmp_path,
                                                                      capsys, caplog):
    data = write_rows(tmp_path / "texts.jsonl", [{"text": text} for text in TEXTS])
    # transformers' own handler holds the stderr of its import time; its records reach caplog only through the root.
    transformers.utils.logging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING):
            assert main(["predict", str(lora_classifier_on_language_model), str(data)]) == 0
    finally:
        transformers.utils.logging.disable_propagation()
    out, err = capsys.readouterr()
    assert "predictions (seq_cls) written" in out
    shown = out + err + caplog.text
    assert "MISSING" not in shown and "newly initialized" not in shown
    assert {row["predicted_label"] for row in read_rows(tmp_path / "texts.predictions.jsonl")} <= set(TOPICS.values())


def test_a_base_lacking_weights_the_adapter_does_not_bring_is_refused(lora_classifier_on_language_model, tmp_path):
    """With the load report held back, weights missing from the backbone must still not pass as random ones."""
    base = tmp_path / "base"
    base.mkdir()
    for name in ("config.json", "ice_text.model", "tokenizer_config.json"):
        (base / name).write_bytes((OFFICIAL_TINY / name).read_bytes())
    weights = torch.load(OFFICIAL_TINY / "pytorch_model.bin", weights_only=True)
    dropped = next(name for name in weights if name.endswith("final_layernorm.weight"))
    torch.save({name: value for name, value in weights.items() if name != dropped}, base / "pytorch_model.bin")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    for source in lora_classifier_on_language_model.iterdir():
        (adapter / source.name).write_bytes(source.read_bytes())
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(base)
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=r"lacks the weights of .*final_layernorm.*does not bring them"):
        load_classifier_for_inference(adapter, device="cpu")


def test_predict_names_its_own_flags_for_the_text_column(full_classifier, tmp_path, capsys):
    folder, _ = full_classifier
    data = write_rows(tmp_path / "two.jsonl", [{"title": "春", "body": "春眠不觉晓"}])
    assert main(["predict", str(folder), str(data)]) == 2
    refusal = capsys.readouterr().err
    assert "--text-column NAME" in refusal and "data.text_column" not in refusal
