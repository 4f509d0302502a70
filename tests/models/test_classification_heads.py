"""ChatGLMForSequenceClassification / ChatGLMForTokenClassification: losses, pooling, padding, Auto classes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
)

import thuglm  # noqa: F401
from thuglm.models import ChatGLMForSequenceClassification, ChatGLMForTokenClassification

from ..conftest import random_weights

OFFICIAL_TINY = Path(__file__).parents[1] / "fixtures" / "official_tiny"
TEXTS = ["北京是中国的首都", "你好", "春眠不觉晓，处处闻啼鸟。"]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(OFFICIAL_TINY)


def sequence_model(num_labels: int, problem_type: str | None = None) -> ChatGLMForSequenceClassification:
    model = AutoModelForSequenceClassification.from_pretrained(
        OFFICIAL_TINY, num_labels=num_labels, problem_type=problem_type, attn_implementation="eager"
    )
    return random_weights(model, seed=3).eval()


def token_model(num_labels: int = 5) -> ChatGLMForTokenClassification:
    model = AutoModelForTokenClassification.from_pretrained(
        OFFICIAL_TINY, num_labels=num_labels, attn_implementation="eager"
    )
    return random_weights(model, seed=4).eval()


def pooled_by_hand(model, tokenizer, texts: list[str]) -> torch.Tensor:
    """score(hidden state of `<sop>`), each text run alone: what the sequence head must give."""
    rows = []
    for text in texts:
        batch = tokenizer([text], return_tensors="pt")
        assert batch["input_ids"][0, -1] == tokenizer.bos_token_id  # `text [gMASK] <sop>` ends with <sop>
        hidden = model.transformer(**batch).last_hidden_state[0, -1]
        rows.append(hidden @ model.score.weight.T)
    return torch.stack(rows)


@torch.no_grad()
def test_single_label_loss_is_cross_entropy_of_the_sop_logits(tokenizer):
    model = sequence_model(3)
    labels = torch.tensor([2, 0, 1])
    output = model(**tokenizer(TEXTS, padding=True, return_tensors="pt"), labels=labels)
    expected_logits = pooled_by_hand(model, tokenizer, TEXTS)
    torch.testing.assert_close(output.logits, expected_logits, atol=1e-5, rtol=0)
    expected = -expected_logits.log_softmax(-1)[torch.arange(3), labels].mean()
    torch.testing.assert_close(output.loss, expected, atol=1e-6, rtol=0)
    assert model.config.problem_type == "single_label_classification"  # guessed from integer labels


@torch.no_grad()
def test_multi_label_loss_is_binary_cross_entropy_with_logits(tokenizer):
    model = sequence_model(4)
    labels = torch.tensor([[1.0, 0, 1, 0], [0, 0, 0, 1], [1, 1, 1, 1]])
    output = model(**tokenizer(TEXTS, padding=True, return_tensors="pt"), labels=labels)
    logits = pooled_by_hand(model, tokenizer, TEXTS)
    p = torch.sigmoid(logits)
    expected = -(labels * p.log() + (1 - labels) * (1 - p).log()).mean()
    torch.testing.assert_close(output.loss, expected, atol=1e-6, rtol=0)
    assert model.config.problem_type == "multi_label_classification"  # guessed from float labels


@torch.no_grad()
def test_regression_loss_is_mean_squared_error(tokenizer):
    model = sequence_model(1)
    targets = torch.tensor([0.5, -1.0, 2.0])
    output = model(**tokenizer(TEXTS, padding=True, return_tensors="pt"), labels=targets)
    predictions = pooled_by_hand(model, tokenizer, TEXTS)[:, 0]
    assert output.logits.shape == (3, 1)
    torch.testing.assert_close(output.loss, ((predictions - targets) ** 2).mean(), atol=1e-6, rtol=0)
    assert model.config.problem_type == "regression"  # num_labels 1


@torch.no_grad()
def test_problem_type_in_the_config_decides_the_loss(tokenizer):
    model = sequence_model(2, problem_type="multi_label_classification")
    labels = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    output = model(**tokenizer(TEXTS, padding=True, return_tensors="pt"), labels=labels)
    torch.testing.assert_close(output.loss, F.binary_cross_entropy_with_logits(output.logits, labels))


@torch.no_grad()
def test_token_loss_is_cross_entropy_over_labelled_pieces_only(tokenizer):
    model = token_model(5)
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 5, batch["input_ids"].shape, generator=generator)
    labels[batch["attention_mask"] == 0] = -100  # padding
    labels[:, -2:] = -100  # [gMASK] <sop>
    output = model(**batch, labels=labels)
    assert output.logits.shape == (*batch["input_ids"].shape, 5)
    kept = labels != -100
    expected = -output.logits.log_softmax(-1)[kept].gather(-1, labels[kept][:, None]).mean()
    torch.testing.assert_close(output.loss, expected, atol=1e-6, rtol=0)


@torch.no_grad()
def test_left_padding_does_not_change_sequence_logits(tokenizer):
    model = sequence_model(3)
    padded = model(**tokenizer(TEXTS, padding=True, return_tensors="pt")).logits
    alone = torch.cat([model(**tokenizer([text], return_tensors="pt")).logits for text in TEXTS])
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=0)


@torch.no_grad()
def test_right_padding_pools_the_same_token(tokenizer):
    """The training collator may pad on either side; the pooled position is each row's last real token."""
    model = sequence_model(3)
    rows = [tokenizer(text)["input_ids"] for text in TEXTS]
    length = max(map(len, rows))
    input_ids = torch.tensor([row + [tokenizer.pad_token_id] * (length - len(row)) for row in rows])
    attention_mask = torch.tensor([[1] * len(row) + [0] * (length - len(row)) for row in rows])
    right = model(input_ids=input_ids, attention_mask=attention_mask).logits
    torch.testing.assert_close(right, pooled_by_hand(model, tokenizer, TEXTS), atol=1e-5, rtol=0)


@torch.no_grad()
def test_left_padding_does_not_change_token_logits(tokenizer):
    model = token_model()
    padded = model(**tokenizer(TEXTS, padding=True, return_tensors="pt")).logits
    for row, text in enumerate(TEXTS):
        alone = model(**tokenizer([text], return_tensors="pt")).logits[0]
        torch.testing.assert_close(padded[row, padded.shape[1] - alone.shape[0] :], alone, atol=1e-5, rtol=0)


@torch.no_grad()
def test_text_tokens_read_the_whole_text(tokenizer):
    """Before `<sop>` attention goes both ways: a later character changes an earlier character's logits."""
    model = token_model()
    first = model(**tokenizer(["北京是中国的首都"], return_tensors="pt")).logits[0, 1]
    changed = model(**tokenizer(["北京是中国的首府"], return_tensors="pt")).logits[0, 1]
    assert (first - changed).abs().max() > 1e-4


@pytest.mark.parametrize("auto_class", [AutoModelForSequenceClassification, AutoModelForTokenClassification])
def test_auto_class_loads_the_official_checkpoint_under_a_fresh_head(auto_class, tmp_path, tokenizer):
    labels = {0: "negative", 1: "neutral", 2: "positive"}
    model = auto_class.from_pretrained(OFFICIAL_TINY, id2label=labels, label2id={v: k for k, v in labels.items()})
    assert type(model).__name__ in ("ChatGLMForSequenceClassification", "ChatGLMForTokenClassification")
    assert model.score.out_features == 3 and model.config.num_labels == 3
    causal = AutoModelForCausalLM.from_pretrained(OFFICIAL_TINY)
    for name, value in causal.transformer.state_dict().items():
        assert torch.equal(model.transformer.state_dict()[name], value), name

    model.save_pretrained(tmp_path)
    reloaded = auto_class.from_pretrained(tmp_path).eval()
    assert reloaded.config.id2label == labels and reloaded.config.architectures == [type(model).__name__]
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, model.eval()(**batch).logits, atol=0, rtol=0)
