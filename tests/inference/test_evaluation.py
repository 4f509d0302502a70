import csv
import json
import math
import re
from pathlib import Path

import pytest
import torch

from thuglm.data import DataError, causal_lm_sample
from thuglm.inference import (
    evaluate_alpaca,
    evaluate_perplexity,
    generate_responses,
    generation_scores,
    load_for_inference,
)

TEXTS = ["春眠不觉晓，处处闻啼鸟。", "今天天气很好，我们去公园散步吧。"]


@pytest.fixture(scope="module")
def loaded(base_dir):
    return load_for_inference(base_dir)


def write_csv(path, column, texts):
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([column])
        writer.writerows([text] for text in texts)
    return path


def summed_loss_by_hand(model, tokenizer, text):
    """Sum of -log p over `text <eop>` after `[gMASK] <sop>`, one sample, from the logits."""
    ids = tokenizer.encode_text([text])[0]
    sample = causal_lm_sample(ids, tokenizer.gmask_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([sample["input_ids"]])).logits[0, :-1]
    labels = torch.tensor(sample["labels"][1:])
    predicted = labels != -100
    log_probs = torch.log_softmax(logits[predicted].double(), dim=-1)
    return -log_probs.gather(1, labels[predicted, None]).sum().item(), int(predicted.sum())


def test_perplexity_is_exp_of_the_token_weighted_loss(loaded, tmp_path):
    tokenizer, model = loaded
    by_hand = [summed_loss_by_hand(model, tokenizer, text) for text in TEXTS]
    tokens = sum(count for _, count in by_hand)
    loss = sum(total for total, _ in by_hand) / tokens
    assert by_hand[0][1] != by_hand[1][1]  # unequal lengths: a mean of per-text means would differ
    metrics = evaluate_perplexity(model, tokenizer, [str(write_csv(tmp_path / "corpus.csv", "text", TEXTS))], batch_size=2)
    assert metrics["tokens"] == tokens
    assert metrics["eval_loss"] == pytest.approx(loss, rel=1e-5)
    assert metrics["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)


def test_identical_answers_score_100():
    scores = generation_scores(["今天天气很好。"], ["今天天气很好。"])
    assert scores == {"bleu-4": 100.0, "rouge-1": 100.0, "rouge-2": 100.0, "rouge-l": 100.0}


def test_disjoint_answers_score_0():
    assert generation_scores(["你好世界"], ["春眠不觉晓"]) == dict.fromkeys(["bleu-4", "rouge-1", "rouge-2", "rouge-l"], 0.0)


def test_a_mixed_case_scores_as_computed_by_hand():
    # jieba: "我爱北京" -> 我 / 爱 / 北京, "我爱上海" -> 我 / 爱 / 上海.
    # ROUGE-1: 2 of 3 words shared both ways, F = 2/3 -> 66.6667. ROUGE-2: bigrams (我 爱)(爱 北京) vs
    # (我 爱)(爱 上海), 1 of 2 -> 50. ROUGE-L: LCS 我 爱 = 2 of 3 -> 66.6667.
    # BLEU-4 over characters 我爱北京 vs 我爱上海 (same length, no brevity penalty): p1 = 2/4, p2 = 1/3 (我爱),
    # p3 = 0/2 and p4 = 0/1, which smoothing method 3 makes 1/(2·2) and 1/(4·1);
    # (1/2 · 1/3 · 1/4 · 1/4) ** (1/4) = 96 ** -0.25 = 0.319472 -> 31.9472.
    scores = generation_scores(["我爱北京"], ["我爱上海"])
    assert scores == {"bleu-4": 31.9472, "rouge-1": 66.6667, "rouge-2": 50.0, "rouge-l": 66.6667}


def test_scores_are_means_over_rows_and_an_empty_answer_scores_0():
    scores = generation_scores(["我爱北京", "", "今天天气很好。"], ["我爱上海", "春眠不觉晓", "今天天气很好。"])
    assert scores["rouge-2"] == pytest.approx((50.0 + 0 + 100) / 3)
    assert scores["bleu-4"] == pytest.approx((31.9472 + 0 + 100) / 3)


def test_scores_need_one_prediction_per_reference():
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        generation_scores(["a", "b"], ["a"])


def test_evaluate_alpaca_scores_the_greedy_answers(loaded, tmp_path):
    tokenizer, model = loaded
    rows = [{"instruction": "你好", "input": "", "output": "你好，有什么可以帮你？"},
            {"instruction": "春天适合做什么？", "input": "", "output": "踏青"}]
    path = tmp_path / "eval.json"
    path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    metrics = evaluate_alpaca(model, tokenizer, [str(path)], max_new_tokens=8)
    answers = generate_responses(model, tokenizer, ["你好", "春天适合做什么？"], max_new_tokens=8)
    assert metrics == {**generation_scores(answers, [row["output"] for row in rows]), "samples": 2}


def test_evaluate_alpaca_needs_outputs(loaded, tmp_path):
    tokenizer, model = loaded
    path = tmp_path / "eval.json"
    path.write_text(json.dumps([{"instruction": "你好", "input": ""}]), encoding="utf-8")
    with pytest.raises(DataError, match="no `output`") as refused:
        evaluate_alpaca(model, tokenizer, [str(path)])
    assert "task: dpo" not in str(refused.value)


def test_eval_of_ranking_pairs_points_to_where_a_dpo_run_measures_them(tiny_dir, tmp_path, capsys, caplog):
    """`thuglm eval` on LLaMA-Factory ranking rows (no `output`): exit 2 with one line naming what measures pairs,
    and their two answer columns called left out, not "not trained"."""
    import logging

    from thuglm.cli import main

    path = tmp_path / "pairs.json"
    path.write_text(json.dumps([{"instruction": "你好", "input": "", "chosen": "好的", "rejected": "不行"}] * 2,
                               ensure_ascii=False), encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="thuglm.data"):
        assert main(["eval", str(tiny_dir), "--data", str(path), "--format", "alpaca"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "no `output`" in error and "task: dpo" in error and "data.eval_files" in error
    (warning,) = [record.message for record in caplog.records if "read by nothing" in record.message]
    assert "left out" in warning and "not trained" not in warning


def test_scoring_without_the_eval_extra_says_how_to_install_it(monkeypatch):
    import importlib.util

    from thuglm.inference.evaluation import MissingScoringPackagesError, generation_scores

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "jieba" else real_find_spec(name, *a))
    with pytest.raises(MissingScoringPackagesError, match=r"needs jieba: install the eval extra") as error:
        generation_scores(["你好"], ["你好"])
    command = re.search(r"`(pip install [^`]+)`", str(error.value)).group(1)
    assert command == 'pip install -e ".[eval]"'
    assert f"`{command}`" in (Path(__file__).parents[2] / "README.md").read_text(encoding="utf-8")  # the same words


def test_eval_names_its_own_flags_for_the_text_column(base_dir, tmp_path, capsys):
    from thuglm.cli import main

    data = tmp_path / "two.csv"
    data.write_text("title,body\n春,春眠不觉晓\n", encoding="utf-8")
    assert main(["eval", str(base_dir), "--data", str(data)]) == 2
    refusal = capsys.readouterr().err
    assert "cannot tell which column holds the text" in refusal
    assert "--text-column NAME" in refusal and "data.text_column" not in refusal
