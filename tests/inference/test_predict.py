"""`thuglm predict`: full and LoRA classifier folders, batching and padding, output rows, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, TaskType, get_peft_model
from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification, AutoTokenizer

import thuglm  # noqa: F401
from thuglm.cli import main
from thuglm.data.classification import align_tokens, token_tags
from thuglm.inference.loading import ModelLoadError
from thuglm.inference.predict import load_classifier_for_inference, predict_file
from thuglm.training.classification import save_classifier_config

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
