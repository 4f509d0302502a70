"""`thuglm train` with `task: seq_cls` / `task: token_cls`, then `thuglm predict`, on learnable synthetic tasks.

The tiny model in the official layout learns, through the CLI, which of three keyword sets a text contains (sequence)
and where the names of a fixed vocabulary of people and places are (tokens); the thresholds are the issue's (0.9 on
held-out rows). The saved output (LoRA adapter + head, or a full model) is then loaded by `thuglm predict`, whose
predictions must score exactly what the training run's evaluation scored.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from peft import PeftModel
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

import thuglm  # noqa: F401
from thuglm.cli import main
from thuglm.data.classification import LabelSpace, align_tokens, piece_tags, token_tags
from thuglm.training.tasks.classification import entity_scores, load_classifier, macro_f1, sequence_metrics
from thuglm.training.config import ConfigError, load_config
from thuglm.training.methods import prepare_for_method

OFFICIAL_TINY = Path(__file__).parents[1] / "fixtures" / "official_tiny"
# Common characters that sentencepiece never joins with the first or last character of a name below.
FILLER = list("的是了我不人在他有这个们来到时大地为子中你说生国年着就那和要她出也得里后自以会")
TOPICS = {"体育": ["足球", "篮球", "比赛"], "天气": ["下雨", "晴天", "刮风"], "饮食": ["米饭", "面条", "饺子"]}
LEARNING_RATES = {"lora": 1e-2, "full": 5e-3}
NAMES = {"PER": ["张三", "李四", "王小明"], "LOC": ["北京", "上海", "广州"]}


def filler(rng: random.Random, low: int, high: int) -> list[str]:
    return [rng.choice(FILLER) for _ in range(rng.randint(low, high))]


def topic_rows(count: int, rng: random.Random) -> list[dict]:
    rows = []
    for _ in range(count):
        label = rng.choice(sorted(TOPICS))
        before, after = filler(rng, 0, 5), filler(rng, 2, 6)
        rows.append({"text": "".join(before) + rng.choice(TOPICS[label]) + "".join(after), "label": label})
    return rows


def name_rows(count: int, rng: random.Random) -> list[dict]:
    rows = []
    for _ in range(count):
        tokens, tags = [], []
        for _ in range(rng.randint(1, 2)):
            words = filler(rng, 2, 4)
            kind = rng.choice(sorted(NAMES))
            name = list(rng.choice(NAMES[kind]))
            tokens += words + name
            tags += ["O"] * len(words) + [f"B-{kind}"] + [f"I-{kind}"] * (len(name) - 1)
        words = filler(rng, 0, 2)
        rows.append({"tokens": tokens + words, "tags": tags + ["O"] * len(words)})
    return rows


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def train_settings(tmp_path: Path, task: str, train: Path, dev: Path, **overrides) -> Path:
    settings = {
        "model": str(OFFICIAL_TINY),
        "task": task,
        "method": "lora",
        "data": {"files": [str(train)], "eval_files": [str(dev)], "cache_dir": str(tmp_path / "hf-cache")},
        "output_dir": str(tmp_path / "out"),
        "max_seq_len": 64,
        "epochs": 3,
        "batch_size": 16,
        "learning_rate": 1e-2,
        "logging_steps": 5,
        "save_steps": 1000,
        "precision": "fp32",
        "seed": 0,
        "report_to": [],
        **overrides,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(settings, allow_unicode=True), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def topic_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("topics")
    rng = random.Random(0)
    return write_jsonl(topic_rows(240, rng), folder / "train.jsonl"), write_jsonl(topic_rows(80, rng), folder / "dev.jsonl")


@pytest.fixture(scope="module")
def name_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("names")
    rng = random.Random(1)
    train, dev = name_rows(240, rng), name_rows(80, rng)
    # The names never share a piece with their neighbours, so tags of pieces and of characters say the same.
    tokenizer = AutoTokenizer.from_pretrained(OFFICIAL_TINY)
    for row in train + dev:
        alignment = align_tokens(tokenizer, row["tokens"], 64)
        assert token_tags(alignment, piece_tags(alignment, row["tags"])) == row["tags"], row
    return write_jsonl(train, folder / "train.jsonl"), write_jsonl(dev, folder / "dev.jsonl")


def test_sequence_classification_lora_learns_and_predict_reloads_it(topic_data, tmp_path):
    train, dev = topic_data
    assert main(["train", str(train_settings(tmp_path, "seq_cls", train, dev))]) == 0
    out = tmp_path / "out"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["eval_accuracy"] >= 0.9 and metrics["eval_macro_f1"] >= 0.9, metrics
    assert "perplexity" not in metrics
    state = json.loads((out / "trainer_state.json").read_text())
    assert not any("eval_perplexity" in entry for entry in state["log_history"])  # a classifier's loss is no LM's
    config = json.loads((out / "config.json").read_text())  # next to the adapter: the labels, for predict
    assert config["id2label"] == {"0": "体育", "1": "天气", "2": "饮食"}
    assert config["architectures"] == ["ChatGLMForSequenceClassification"]
    assert (out / "adapter_model.safetensors").is_file() and not (out / "model.safetensors").exists()

    predictions = tmp_path / "predictions.jsonl"
    assert main(["predict", str(out), str(dev), "--output", str(predictions), "--batch-size", "7"]) == 0
    rows = read_jsonl(predictions)
    assert len(rows) == 80 and all(0.0 < row["probability"] <= 1.0 for row in rows)
    accuracy = np.mean([row["predicted_label"] == row["label"] for row in rows])
    assert accuracy == pytest.approx(metrics["eval_accuracy"], abs=1e-9)  # the reloaded model predicts the same

    # Plain transformers + peft read the same output folder to the same probabilities.
    base = AutoModelForSequenceClassification.from_pretrained(OFFICIAL_TINY, config=AutoConfig.from_pretrained(out))
    model = PeftModel.from_pretrained(base, out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    with torch.no_grad():
        logits = model(**tokenizer([row["text"] for row in rows[:8]], padding=True, return_tensors="pt")).logits
    probabilities = logits.softmax(-1).max(-1).values
    np.testing.assert_allclose(probabilities.numpy(), [row["probability"] for row in rows[:8]], atol=1e-5)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_token_classification_learns_entities_and_predict_reloads_it(name_data, method, tmp_path):
    train, dev = name_data
    config = train_settings(tmp_path, "token_cls", train, dev, method=method, learning_rate=LEARNING_RATES[method])
    assert main(["train", str(config)]) == 0
    out = tmp_path / "out"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["eval_f1"] >= 0.9, metrics
    saved = json.loads((out / "config.json").read_text())
    assert saved["architectures"] == ["ChatGLMForTokenClassification"]
    assert set(saved["label2id"]) == {"O", "B-LOC", "I-LOC", "B-PER", "I-PER"}

    predictions = tmp_path / "predictions.jsonl"
    assert main(["predict", str(out), str(dev), "--output", str(predictions)]) == 0
    rows = read_jsonl(predictions)
    assert all(len(row["predicted_tags"]) == len(row["tokens"]) for row in rows)
    scores = entity_scores([row["tags"] for row in rows], [row["predicted_tags"] for row in rows])
    assert scores["f1"] == pytest.approx(metrics["eval_f1"], abs=1e-9)
    found = [entity["text"] for row in rows for entity in row["entities"]]
    assert found and set(found) <= {name for names in NAMES.values() for name in names}


def test_multi_label_and_regression_labels_reach_the_config_and_predict(tmp_path):
    rows = [{"text": text, "topics": topics, "score": score}
            for text, topics, score in [("足球比赛", ["体育"], 0.5), ("下雨天吃面条", ["天气", "饮食"], 1.5),
                                        ("晴天", ["天气"], 2.25), ("米饭", ["饮食"], -1.0)]]
    data = write_jsonl(rows, tmp_path / "rows.jsonl")
    for column, problem_type, key in [("topics", "multi_label_classification", "predicted_labels"),
                                      ("score", "regression", "predicted_value")]:
        out = tmp_path / column
        config = train_settings(tmp_path, "seq_cls", data, data, method="full", max_steps=2, output_dir=str(out))
        assert main(["train", str(config), f"data.label_column={column}"]) == 0
        saved = json.loads((out / "config.json").read_text())
        assert saved["problem_type"] == problem_type
        assert main(["predict", str(out), str(data), "--output", str(tmp_path / f"{column}.jsonl")]) == 0
        assert all(key in row for row in read_jsonl(tmp_path / f"{column}.jsonl"))


def test_user_errors_are_one_line_with_exit_status_2(topic_data, tmp_path, capsys):
    train, dev = topic_data
    config = train_settings(tmp_path, "seq_cls", train, dev)
    assert main(["train", str(config), "data.label_column=topic"]) == 2
    assert "no column 'topic'" in capsys.readouterr().err
    assert main(["train", str(config), "data.format=alpaca"]) == 2
    assert "task: seq_cls" in capsys.readouterr().err
    assert main(["predict", str(OFFICIAL_TINY), str(dev)]) == 2
    assert "not a classifier" in capsys.readouterr().err


def test_fp16_lora_trains_an_fp32_head():
    """The fp16 gradient scaler refuses fp16 gradients; the head that LoRA trains whole must be fp32 (GPU only in CI's
    absence, so checked here on the parameters and one backward pass on CPU)."""
    space = LabelSpace("single_label_classification", ["a", "b", "c"])
    model = load_classifier(OFFICIAL_TINY, torch.float16, "sdpa", "seq_cls", space)
    config = load_config(None, ["model=tiny", "data.files=x.csv", "task=seq_cls", "method=lora"])
    model = prepare_for_method(model, config)
    head = model.base_model.model.score.modules_to_save["default"]
    assert head.weight.dtype == torch.float32 and head.weight.requires_grad
    assert model.base_model.model.transformer.word_embeddings.weight.dtype == torch.float16
    tokenizer = AutoTokenizer.from_pretrained(OFFICIAL_TINY)
    output = model(**tokenizer(["你好", "北京"], padding=True, return_tensors="pt"), labels=torch.tensor([0, 2]))
    output.loss.backward()
    assert output.logits.dtype == torch.float32 and head.weight.grad.dtype == torch.float32


@pytest.mark.parametrize(("override", "message"), [
    ("packing=true", "one sample a row"),
    ("data.streaming=true", "data.streaming: false"),
    ("data.tokens_column=tokens", "are for `task: token_cls`"),
    ("task=token_cls", "are for `task: seq_cls`"),  # data.label_column below is a seq_cls key
])
def test_classification_config_checks(override, message):
    overrides = ["model=tiny", "data.files=x.csv", "task=seq_cls", "data.label_column=label", "max_steps=5", override]
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_metrics_match_hand_counts():
    predictions, labels = np.array([0, 1, 1, 2]), np.array([0, 1, 2, 2])
    # F1 per class: 0 -> 1, 1 -> 2/3 (P 1/2, R 1), 2 -> 2/3 (P 1, R 1/2)
    assert macro_f1(predictions, labels) == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)
    logits = np.eye(3)[predictions]
    assert sequence_metrics(logits, labels, "single_label_classification")["accuracy"] == 0.75
    gold = [["B-PER", "I-PER", "O", "B-LOC"]]
    guess = [["B-PER", "I-PER", "O", "B-PER"]]
    assert entity_scores(gold, guess) == {"precision": 0.5, "recall": 0.5, "f1": 0.5}
