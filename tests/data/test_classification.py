"""Classification rows: label spaces, `text [gMASK] <sop>`, and BIO tags of tokens aligned with sentencepiece pieces."""

from __future__ import annotations

from pathlib import Path

import datasets
import pytest
from transformers import AutoTokenizer

import thuglm  # noqa: F401
from thuglm.data import DataError
from thuglm.data.classification import (
    LabelSpace,
    align_tokens,
    encode_sequence_dataset,
    encode_token_dataset,
    entities,
    join_tokens,
    piece_tags,
    sequence_label_space,
    tag_label_space,
    token_tags,
)

OFFICIAL_TINY = Path(__file__).parents[1] / "fixtures" / "official_tiny"


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(OFFICIAL_TINY)


def test_label_spaces_follow_the_kind_of_label():
    assert sequence_label_space(["b", "a", "b"], "f") == LabelSpace("single_label_classification", ["a", "b"])
    assert sequence_label_space([2, 0, 10], "f") == LabelSpace("single_label_classification", ["0", "2", "10"])
    assert sequence_label_space([0.5, 1.0], "f").problem_type == "regression"
    assert sequence_label_space([1.0, 2.0], "f").names == ["1", "2"]  # whole numbers from a CSV are classes
    multi = sequence_label_space([["x", "y"], [], ["z"]], "f")
    assert multi == LabelSpace("multi_label_classification", ["x", "y", "z"])
    assert multi.config_kwargs()["id2label"] == {0: "x", 1: "y", 2: "z"}
    with pytest.raises(DataError, match="no label"):
        sequence_label_space(["a", None], "train.csv")
    with pytest.raises(DataError, match="mixes"):
        sequence_label_space(["a", 1], "train.csv")


def test_tag_space_has_o_first_and_both_prefixes_of_every_type():
    space = tag_label_space([["O", "B-PER", "I-PER"], ["B-LOC"]], "f")
    assert space.names == ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]
    with pytest.raises(DataError, match="not BIO"):
        tag_label_space([["PER"]], "train.jsonl")


def test_sequence_rows_end_with_gmask_sop_and_carry_label_ids(tokenizer):
    raw = datasets.Dataset.from_dict({"text": ["你好", "北京是中国的首都" * 20], "label": ["b", "a"]})
    space = sequence_label_space(raw["label"], "f")
    rows = encode_sequence_dataset(raw, tokenizer, text_column="text", label_column="label", space=space,
                                   max_seq_len=16)
    assert rows[0]["input_ids"] == tokenizer("你好")["input_ids"] and rows[0]["labels"] == 1
    assert len(rows[1]["input_ids"]) == 16 and rows[1]["input_ids"][-2:] == tokenizer("")["input_ids"][-2:]


def test_tokens_join_with_spaces_only_between_ascii_words():
    text, spans = join_tokens(["我", "在", "New", "York", "。"])
    assert text == "我在New York。"
    assert [text.encode()[a:b].decode() for a, b in spans] == ["我", "在", "New", "York", "。"]


def test_piece_tags_round_trip_when_pieces_respect_the_entities(tokenizer):
    tokens = [*"我爱", "北", "京", *"和", "Python"]
    tags = ["O", "O", "B-LOC", "I-LOC", "O", "B-LANG"]
    alignment = align_tokens(tokenizer, tokens, max_seq_len=64)
    assert alignment.input_ids[:-2] == tokenizer.encode_text(["我爱北京和Python"])[0]
    assert alignment.input_ids[-2:] == [tokenizer.gmask_token_id, tokenizer.bos_token_id]
    pieces = [tokenizer.convert_ids_to_tokens(i) for i in alignment.input_ids[:-2]]
    per_piece = piece_tags(alignment, tags)
    # "北京" is one piece: it takes the tag of its first character; "Python" is several: B- then I-.
    tagged = dict(zip(pieces, per_piece))
    assert tagged["北京"] == "B-LOC" and tagged["▁"] is None
    language = [tag for tag in per_piece if tag is not None and tag.endswith("LANG")]
    assert len(language) > 1 and language == ["B-LANG"] + ["I-LANG"] * (len(language) - 1)
    assert token_tags(alignment, per_piece) == tags


def test_an_entity_boundary_inside_a_piece_is_the_documented_loss(tokenizer):
    tokens, tags = list("是中国"), ["O", "B-LOC", "I-LOC"]
    alignment = align_tokens(tokenizer, tokens, max_seq_len=64)
    assert "是中国" in tokenizer.convert_ids_to_tokens(alignment.input_ids)  # one piece over O and B-LOC
    assert token_tags(alignment, piece_tags(alignment, tags)) == ["O", "O", "O"]


def test_byte_fallback_characters_and_truncated_tokens(tokenizer):
    tokens, tags = ["𝄞", "好"], ["B-X", "O"]
    alignment = align_tokens(tokenizer, tokens, max_seq_len=64)
    assert token_tags(alignment, piece_tags(alignment, tags)) == tags  # 4 byte pieces, one carries the tag
    short = align_tokens(tokenizer, list("北京是中国的首都"), max_seq_len=4)
    assert len(short.input_ids) == 4 and token_tags(short, ["B-LOC", "I-LOC"])[-1] == "O"


def test_token_rows_label_pieces_and_not_gmask_sop(tokenizer):
    raw = datasets.Dataset.from_dict({"tokens": [list("我爱北京")], "tags": [["O", "O", "B-LOC", "I-LOC"]]})
    space = tag_label_space(raw["tags"], "f")
    row = encode_token_dataset(raw, tokenizer, tokens_column="tokens", tags_column="tags", space=space,
                               max_seq_len=64)[0]
    assert len(row["labels"]) == len(row["input_ids"]) and row["labels"][-2:] == [-100, -100]
    assert [space.names[i] for i in row["labels"] if i != -100] == ["O", "O", "B-LOC"]
    bad = datasets.Dataset.from_dict({"tokens": [list("我爱")], "tags": [["O"]]})
    with pytest.raises(DataError, match="row 1 has 2 tokens but 1 tags"):
        encode_token_dataset(bad, tokenizer, tokens_column="tokens", tags_column="tags", space=space, max_seq_len=64)
    as_text = datasets.Dataset.from_dict({"tokens": ["我爱"], "tags": ["O O"]})
    with pytest.raises(DataError, match="not a list"):
        encode_token_dataset(as_text, tokenizer, tokens_column="tokens", tags_column="tags", space=space,
                             max_seq_len=64, source="ner.csv")


def test_entities_read_bio_as_conlleval_does():
    assert entities(["B-PER", "I-PER", "O", "B-LOC"]) == {("PER", 0, 2), ("LOC", 3, 4)}
    assert entities(["I-PER", "I-PER", "B-PER", "I-LOC"]) == {("PER", 0, 2), ("PER", 2, 3), ("LOC", 3, 4)}
    assert entities(["O", "O"]) == set()
