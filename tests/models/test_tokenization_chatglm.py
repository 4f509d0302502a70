import random

import pytest

from thuglm.models import ChatGLMTokenizer
from thuglm.models.tokenization_chatglm import postprocess_text, preprocess_text

TRICKY = [
    "你好",
    "Hello world",
    "ChatGLM-6B 是一个开源的、支持中英双语的对话语言模型。",
    "第一行\n第二行\n\n第四行",
    "\t缩进\t\t两个制表符",
    "两个  空格，三个   空格",
    " " * 100 + "很长的空白",
    "  前后都有空格  ",
    "数字 12345 和 3.14159",
    "表情😀🎉 和罕见字𠀀",
    "全角标点：，。！？；（）",
    "mixed中英文mixed",
    "",
]


def official_preprocess(text: str) -> str:
    """The official tokenizer's preprocessing, as its source spells it (replace runs of 80, 79, ..., 2 spaces)."""
    text = text.replace("\n", "<n>").replace("\t", "<|tab|>")
    for length in range(80, 1, -1):
        text = text.replace(" " * length, f"<|blank_{length}|>")
    return text


def test_preprocessing_equals_the_official_loop_on_random_whitespace():
    rng = random.Random(0)
    pieces = [" ", "  ", " " * 7, " " * 81, " " * 170, "\t", "\n", "字", "ab"]
    for _ in range(300):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))
        assert preprocess_text(text) == official_preprocess(text)
        assert postprocess_text(preprocess_text(text)) == text


@pytest.mark.parametrize("text", TRICKY)
def test_decode_inverts_encode(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert tokenizer.encode_text([text])[0] == ids


def test_single_text_and_pair_layouts(tokenizer):
    a, b = tokenizer.encode_text(["问题", "回答"])
    gmask, sop, eop = tokenizer.gmask_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id
    assert tokenizer("问题")["input_ids"] == a + [gmask, sop]
    assert tokenizer("问题", "回答")["input_ids"] == a + [gmask, sop] + b + [eop]
    assert tokenizer.convert_ids_to_tokens([gmask, sop, eop]) == ["[gMASK]", "<sop>", "<eop>"]


def test_batch_is_left_padded_with_unshifted_positions(tokenizer):
    batch = tokenizer(["春天", "今天天气很好"], padding=True)
    short, long = batch["input_ids"]
    pad = len(long) - len(tokenizer("春天")["input_ids"])
    assert short[:pad] == [tokenizer.pad_token_id] * pad
    assert batch["attention_mask"][0] == [0] * pad + [1] * (len(long) - pad)
    alone = tokenizer("春天")["position_ids"]
    assert [row[pad:] for row in batch["position_ids"][0]] == alone
    assert [row[:pad] for row in batch["position_ids"][0]] == [[0] * pad, [0] * pad]
    # position: 0..n-1 over the text and [gMASK], then frozen at [gMASK]; block: 0, then 1 at <sop>
    n = len(alone[0])
    assert alone == [list(range(n - 1)) + [n - 2], [0] * (n - 1) + [1]]


def test_pad_keeps_given_position_ids(tokenizer):
    features = [tokenizer("春天"), tokenizer("今天天气很好")]
    padded = tokenizer.pad(features, return_tensors="pt")
    assert padded["position_ids"].shape == (2, 2, padded["input_ids"].shape[1])


def test_right_padding_is_refused(tokenizer):
    with pytest.raises(ValueError, match="left"):
        tokenizer(["a", "bb"], padding=True, padding_side="right")


def test_image_token_offset(tiny_dir, tokenizer):
    shifted = ChatGLMTokenizer(vocab_file=str(tiny_dir / "ice_text.model"), num_image_tokens=20000)
    ids = tokenizer("你好")["input_ids"]
    assert shifted("你好")["input_ids"] == [i + 20000 for i in ids]
    assert shifted.vocab_size == tokenizer.vocab_size + 20000
    assert shifted.convert_ids_to_tokens(5) == "<image_5>"
    assert shifted.decode([5] + shifted("你好", add_special_tokens=False)["input_ids"]) == "你好"


def test_save_and_reload_gives_the_same_ids(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    assert (tmp_path / "ice_text.model").is_file()
    reloaded = ChatGLMTokenizer.from_pretrained(tmp_path)
    for text in TRICKY:
        assert reloaded(text)["input_ids"] == tokenizer(text)["input_ids"]


def test_decode_drops_padding_and_can_skip_special_tokens(tokenizer):
    ids = tokenizer(["春天", "今天天气很好"], padding=True)["input_ids"][0]
    assert tokenizer.decode(ids) == "春天[gMASK]<sop>"
    assert tokenizer.decode(ids, skip_special_tokens=True) == "春天"


def test_tokenizer_positions_equal_the_models_batched_rule(tokenizer):
    import torch

    from thuglm.models.masking import glm_position_ids

    rng = random.Random(0)
    specials = [tokenizer.gmask_token_id, tokenizer.mask_token_id, tokenizer.bos_token_id]
    for _ in range(200):
        ids = [rng.choice(specials) if rng.random() < 0.15 else rng.randrange(20, 200) for _ in range(rng.randint(1, 20))]
        batched = glm_position_ids(
            torch.tensor([ids]), None, tokenizer.bos_token_id, tokenizer.mask_token_id, tokenizer.gmask_token_id
        )
        assert tokenizer.position_ids_for(ids) == batched[0].tolist(), ids


def test_added_tokens_split_out_and_survive_saving(tiny_dir, tmp_path):
    tokenizer = ChatGLMTokenizer.from_pretrained(tiny_dir)
    tokenizer.add_tokens(["<新词>"])
    new_id = tokenizer.convert_tokens_to_ids("<新词>")
    assert new_id >= tokenizer.vocab_size
    ids = tokenizer("前<新词>后", add_special_tokens=False)["input_ids"]
    assert new_id in ids
    tokenizer.save_pretrained(tmp_path)
    reloaded = ChatGLMTokenizer.from_pretrained(tmp_path)
    assert reloaded("前<新词>后", add_special_tokens=False)["input_ids"] == ids
    assert reloaded.decode(ids) == "前<新词>后"
    assert reloaded("你好")["input_ids"] == tokenizer("你好")["input_ids"]
