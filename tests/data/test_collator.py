"""Right padding that changes nothing for the real tokens."""

from __future__ import annotations

import torch

from thuglm.data import IGNORE_INDEX, GlmCollator, causal_lm_sample


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
