"""Right padding that changes nothing for the real tokens."""

from __future__ import annotations

import pytest
import torch

from thuglm.data import IGNORE_INDEX, GlmCollator, causal_lm_sample
from thuglm.models import MissingGlmTokensError


def test_padding_values_and_shapes():
    features = [
        {"input_ids": [1, 2, 3], "labels": [-100, 2, 3], "attention_mask": [1, 1, 2]},
        {"input_ids": [4], "labels": [4], "attention_mask": [1]},
    ]
    batch = GlmCollator(pad_token_id=0, pad_to_multiple_of=4)(features)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 0], [4, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 2, 3, IGNORE_INDEX], [4, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch["attention_mask"].tolist() == [[1, 1, 2, 0], [1, 0, 0, 0]]
    assert all(t.dtype == torch.long for t in batch.values())


def test_a_padded_batch_gives_each_row_its_loss_alone(tokenizer, model):
    ids = tokenizer.encode_text(["春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。", "你好"])
    rows = [causal_lm_sample(i, tokenizer.gmask_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) for i in ids]
    rows = [{**r, "attention_mask": [1] * len(r["input_ids"])} for r in rows]
    collate = GlmCollator(tokenizer.pad_token_id)
    with torch.no_grad():
        alone = [float(model(**collate([row])).loss) for row in rows]
        batch = collate(rows)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    losses = torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:], reduction="none", ignore_index=IGNORE_INDEX
    )
    counts = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(1)
    torch.testing.assert_close((losses.sum(1) / counts).tolist(), alone, atol=1e-5, rtol=0)


def test_position_ids_from_the_collator_are_those_the_model_derives(tokenizer, model):
    ids = tokenizer.encode_text(["春眠不觉晓，处处闻啼鸟。", "你好", "夜来风雨声"])
    rows = [causal_lm_sample(i, tokenizer.gmask_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) for i in ids]
    packed = {name: rows[0][name] + rows[1][name] for name in ("input_ids", "labels")}
    packed["attention_mask"] = [1] * len(rows[0]["input_ids"]) + [2] * len(rows[1]["input_ids"])
    features = [packed, {**rows[2], "attention_mask": [1] * len(rows[2]["input_ids"])}]  # packed, then padded
    batch = GlmCollator.for_model(tokenizer.pad_token_id, model.config)(features)
    derived = model.transformer.derive_position_ids(batch["input_ids"], batch["attention_mask"])
    assert torch.equal(batch["position_ids"], derived)
    with torch.no_grad():
        given = model(**batch).loss
        without = model(**{name: value for name, value in batch.items() if name != "position_ids"}).loss
    assert float(given) == float(without)


def test_a_row_without_sop_is_refused_by_the_collator_with_its_row_number(tokenizer, model):
    good = causal_lm_sample(tokenizer.encode_text(["你好"])[0], tokenizer.gmask_token_id, tokenizer.bos_token_id,
                            tokenizer.eos_token_id)
    bad = {name: [value for value, token in zip(good[name], good["input_ids"]) if token != tokenizer.bos_token_id]
           for name in ("input_ids", "labels")}
    collate = GlmCollator.for_model(tokenizer.pad_token_id, model.config)
    with pytest.raises(MissingGlmTokensError, match=r"row 1 .*no <sop>"):
        collate([{**good, "attention_mask": [1] * len(good["input_ids"])},
                 {**bad, "attention_mask": [1] * len(bad["input_ids"])}])
