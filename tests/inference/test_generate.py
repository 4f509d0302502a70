import json

import pytest

from thuglm.data import DataError
from thuglm.inference import (
    build_prompt,
    generate_responses,
    load_for_inference,
    read_prompts,
    write_jsonl,
)

PROMPTS = ["你好", "春天适合做什么？", "请写一首关于月亮的诗。", "晚上睡不着应该怎么办"]
GREEDY = {"do_sample": False, "max_length": None, "max_new_tokens": 16}


@pytest.fixture(scope="module")
def loaded(base_dir, adapter_dir):
    return load_for_inference(base_dir, adapter=adapter_dir)


def chat_answer(model, tokenizer, query, history=()):
    return model.chat(tokenizer, query, list(history), **GREEDY)[0]


def test_greedy_batches_answer_as_chat_does(loaded):
    """Batches of 3 and 1 prompts, left-padded to different lengths; ordered by length, then put back in order."""
    tokenizer, model = loaded
    expected = [chat_answer(model, tokenizer, prompt) for prompt in PROMPTS]
    assert generate_responses(model, tokenizer, PROMPTS, batch_size=3, max_new_tokens=16) == expected
    assert len(set(expected)) > 1 and all(expected)  # the tiny model's answers vary: the check means something


def test_rows_that_end_early_in_a_batch_answer_as_chat_does(base_dir):
    """Make the third token of one answer the end token: that row stops while the others go on."""
    tokenizer, model = load_for_inference(base_dir)
    batch = tokenizer(PROMPTS[:1], return_tensors="pt")
    third = model.generate(**batch, do_sample=False, max_new_tokens=3)[0, -1].item()
    model.generation_config.eos_token_id = third
    responses = generate_responses(model, tokenizer, PROMPTS, batch_size=8, max_new_tokens=16)
    assert responses == [chat_answer(model, tokenizer, prompt) for prompt in PROMPTS]
    assert len({len(response) for response in responses}) > 1


def test_a_prompt_with_history_answers_as_chat_with_that_history(loaded, tmp_path):
    tokenizer, model = loaded
    history = [["你好", "你好，有什么可以帮你？"]]
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([{"instruction": "春天适合做什么？", "input": "", "history": history, "output": "踏青"}]))
    (row,) = read_prompts(path)
    assert row == {"prompt": build_prompt("春天适合做什么？", [tuple(history[0])]), "reference": "踏青"}
    assert generate_responses(model, tokenizer, [row["prompt"]], max_new_tokens=16) == [
        chat_answer(model, tokenizer, "春天适合做什么？", [tuple(history[0])])
    ]


def test_read_prompts_txt_skips_blank_lines(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("你好\n\n  \n春天适合做什么？\n", encoding="utf-8")
    assert read_prompts(path) == [{"prompt": "你好"}, {"prompt": "春天适合做什么？"}]


def test_read_prompts_jsonl_keeps_references(tmp_path):
    path = tmp_path / "prompts.jsonl"
    rows = [{"prompt": "你好"}, {"prompt": "一加一", "reference": "二"}, {"instruction": "翻译", "output": "hi"}]
    path.write_text("\n".join(json.dumps(row, ensure_ascii=False) for row in rows) + "\n\n", encoding="utf-8")
    assert read_prompts(path) == [
        {"prompt": "你好"},
        {"prompt": "一加一", "reference": "二"},
        {"prompt": "翻译", "reference": "hi"},
    ]


def test_read_prompts_alpaca_json_joins_instruction_and_input(tmp_path):
    path = tmp_path / "alpaca.json"
    rows = [{"instruction": "把这句话翻译成英文", "input": "你好", "output": "Hello"}]
    path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    (row,) = read_prompts(path)
    assert row["reference"] == "Hello"
    assert row["prompt"].startswith("把这句话翻译成英文") and row["prompt"].endswith("你好")


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("prompts.csv", "prompt\n你好\n", r"\.txt.*\.json.*\.jsonl"),
        ("rows.json", '{"prompt": "你好"}', "a list of rows"),
        ("rows.jsonl", '{"question": "你好"}\n', r"rows.jsonl:1.*`prompt` or an `instruction`"),
        ("rows.jsonl", '{"prompt": \n', "not valid JSON"),
    ],
)
def test_bad_prompt_files_say_what_is_wrong(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=message):
        read_prompts(path)


def test_write_jsonl_keeps_chinese_readable(tmp_path):
    path = write_jsonl([{"prompt": "你好", "response": "您好"}], tmp_path / "out" / "answers.jsonl")
    assert path.read_text(encoding="utf-8") == '{"prompt": "你好", "response": "您好"}\n'


def test_generate_does_not_name_train_config_keys_for_its_input(base_dir, tmp_path, capsys):
    from thuglm.cli import main

    empty = tmp_path / "prompts.csv"
    empty.write_bytes(b"")
    output = tmp_path / "answers.jsonl"
    assert main(["generate", str(base_dir), "--input", str(empty), "--output", str(output), "data.format=alpaca"]) == 2
    refusal = capsys.readouterr().err
    assert "prompts.csv: the file is empty (0 bytes). Export the data again." in refusal
    assert "data.files" not in refusal  # generate reads one --input file, not a data.files list
