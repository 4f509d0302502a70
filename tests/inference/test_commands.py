"""`thuglm chat / merge / generate / eval`, run in-process through `thuglm.cli.main`."""

import io
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from thuglm.cli import main
from thuglm.inference import generate_responses, load_for_inference

GREEDY = ["--max-new-tokens", "12"]


def test_chat_with_an_adapter_answers_as_the_adapted_model(output_dir, base_dir, adapter_dir, monkeypatch, capsys):
    tokenizer, model = load_for_inference(base_dir, adapter=adapter_dir)
    expected = model.chat(tokenizer, "春天适合做什么？", do_sample=False, max_length=None, max_new_tokens=12)[0]
    monkeypatch.setattr("sys.stdin", io.StringIO("春天适合做什么？\n/exit\n"))
    assert main(["chat", str(base_dir), "--adapter", str(adapter_dir), "--greedy", *GREEDY]) == 0
    assert expected in capsys.readouterr().out


def test_chat_takes_a_training_output_folder(output_dir, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("你好\n"))
    assert main(["chat", str(output_dir), "--greedy", *GREEDY]) == 0
    assert capsys.readouterr().out.count("ChatGLM：") == 1


def test_merge_writes_a_standalone_model(base_dir, adapter_dir, tmp_path, capsys):
    out = tmp_path / "merged"
    assert main(["merge", "--base", str(base_dir), "--adapter", str(adapter_dir), "--out", str(out)]) == 0
    assert f"merged model written to {out}" in capsys.readouterr().out
    assert AutoModelForCausalLM.from_pretrained(out).config.model_type == "chatglm"
    assert main(["merge", "--adapter", str(adapter_dir), "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err


def test_generate_writes_greedy_answers_with_references(output_dir, tmp_path):
    rows = [{"prompt": "你好"}, {"instruction": "春天适合做什么？", "input": "", "output": "踏青"}]
    source = tmp_path / "prompts.jsonl"
    source.write_text("\n".join(json.dumps(row, ensure_ascii=False) for row in rows), encoding="utf-8")
    target = tmp_path / "answers.jsonl"
    assert main(["generate", str(output_dir), "--input", str(source), "--output", str(target), *GREEDY]) == 0
    written = [json.loads(line) for line in target.read_text(encoding="utf-8").splitlines()]
    tokenizer, model = load_for_inference(output_dir)
    answers = generate_responses(model, tokenizer, ["你好", "春天适合做什么？"], max_new_tokens=12)
    assert written == [
        {"prompt": "你好", "response": answers[0]},
        {"prompt": "春天适合做什么？", "response": answers[1], "reference": "踏青"},
    ]


def test_eval_text_prints_and_writes_perplexity(base_dir, tmp_path, capsys):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"sentence": "春眠不觉晓，处处闻啼鸟。"}\n', encoding="utf-8")
    report = tmp_path / "metrics" / "eval.json"
    args = ["eval", str(base_dir), "--data", str(corpus), "--text-column", "sentence", "--output", str(report)]
    assert main(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert set(printed) == {"eval_loss", "perplexity", "tokens"}
    assert printed["perplexity"] == pytest.approx(torch.tensor(printed["eval_loss"]).exp().item(), rel=1e-5)
    assert json.loads(report.read_text(encoding="utf-8")) == printed


def test_lengths_past_the_models_context_are_refused_or_explained(base_dir, tmp_path, monkeypatch, capsys, caplog):
    """The tiny model says max_sequence_length 2048, as ChatGLM-6B: eval's windows may not be longer (exit 2, as
    `thuglm train` refuses max_seq_len); chat may answer past it, and is told where the trained context ends."""
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"sentence": "春眠不觉晓，处处闻啼鸟。"}\n', encoding="utf-8")
    args = ["eval", str(base_dir), "--data", str(corpus), "--text-column", "sentence"]
    assert main([*args, "--max-seq-len", "4096"]) == 2
    assert "--max-seq-len 4096 is longer than the 2048 tokens the model was trained on" in capsys.readouterr().err
    assert main([*args, "--max-seq-len", "2048"]) == 0
    monkeypatch.setattr("sys.stdin", io.StringIO("/exit\n"))
    assert main(["chat", str(base_dir), "--max-new-tokens", "4096"]) == 0
    assert "--max-new-tokens 4096: 4096 tokens of prompt and answer, past the 2048" in caplog.text


def test_eval_alpaca_prints_scores(base_dir, tmp_path, capsys):
    data = tmp_path / "eval.json"
    data.write_text(json.dumps([{"instruction": "你好", "input": "", "output": "你好"}], ensure_ascii=False))
    assert main(["eval", str(base_dir), "--data", str(data), "--format", "alpaca", *GREEDY]) == 0
    assert set(json.loads(capsys.readouterr().out)) == {"bleu-4", "rouge-1", "rouge-2", "rouge-l", "samples"}


@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", "{base}", "--input", "{tmp}/missing.txt", "--output", "{tmp}/out.jsonl"], "does not exist"),
        (["eval", "{tmp}", "--data", "{tmp}/x.csv"], "no config.json"),
        (["chat", "{base}", "--adapter", "{tmp}"], "no adapter_config.json"),
    ],
)
def test_user_errors_are_one_line_with_status_2(base_dir, tmp_path, capsys, args, message):
    args = [arg.format(base=base_dir, tmp=tmp_path) for arg in args]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("thuglm: ") and message in err and "Traceback" not in err
