"""Rows for the classification heads: `text [gMASK] <sop>` with a label (seq_cls) or a BIO tag per text piece
(token_cls).

Every text token sits before `<sop>`, where GLM attends in both directions, so the sequence head (pooled at `<sop>`)
and the token head both read the whole text.

Labels become ids through a `LabelSpace` found in the data and saved in the model's config (`id2label`,
`label2id`, `problem_type`), so a trained model needs nothing else to predict:

* seq_cls: strings or integers are classes (single-label); numbers with decimals are a regression target; lists of
  strings (JSON / JSONL rows) are sets of classes (multi-label).
* token_cls: a list of tokens and a list of BIO tags (`B-PER`, `I-PER`, `O`) a row. The tokens are joined into one
  text (with a space only between two ASCII letters or digits, so Chinese characters join as written) and
  sentencepiece cuts it into its usual pieces. A piece takes the tag of the token it starts in (`I-X` when it starts
  inside a token); the tag of a token is read back from the piece its first character is in (`I-X` / `O` when that
  piece began in an earlier token). Where sentencepiece joins the edge of an entity and a neighbouring character
  into one piece (`是中国`: O, B-LOC, I-LOC), that boundary cannot be represented: such rows are counted in a
  warning.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import datasets

from .loading import DataError
from .processing import TOKEN_IDS, cached_map, layout_ids, sentencepiece_threads, text_or_empty
from .samples import IGNORE_INDEX

logger = logging.getLogger("thuglm.data")

LABEL_COLUMNS = ("label", "labels")
TOKENS_COLUMNS = ("tokens",)
TAGS_COLUMNS = ("tags", "ner_tags")
SINGLE_LABEL, MULTI_LABEL, REGRESSION = "single_label_classification", "multi_label_classification", "regression"


# ---- label spaces ------------------------------------------------------------------------------------------------------
@dataclass
class LabelSpace:
    """The labels a head predicts, in id order, and how the loss reads them (transformers' `problem_type`)."""

    problem_type: str | None
    names: list[str] = field(default_factory=list)

    @property
    def num_labels(self) -> int:
        return 1 if self.problem_type == REGRESSION else len(self.names)

    @property
    def label2id(self) -> dict[str, int]:
        return {name: index for index, name in enumerate(self.names)}

    def config_kwargs(self) -> dict:
        """What goes into the model's config: `from_pretrained(path, **space.config_kwargs())`."""
        names = self.names if self.problem_type != REGRESSION else ["value"]
        return {
            "num_labels": self.num_labels,
            "id2label": dict(enumerate(names)),
            "label2id": {name: index for index, name in enumerate(names)},
            "problem_type": self.problem_type,
        }


def find_column(names: Sequence[str], requested: str | None, defaults: Sequence[str], key: str, source: str) -> str:
    """`requested` (the user's config key) if it exists, else the first of `defaults` present."""
    listed = ", ".join(names) or "none"
    if requested is not None:
        if requested not in names:
            raise DataError(f"{source}: no column {requested!r} (columns: {listed}); set `{key}` to one of them")
        return requested
    for candidate in defaults:
        if candidate in names:
            return candidate
    raise DataError(f"{source}: no column {' or '.join(map(repr, defaults))} (columns: {listed}); set `{key}=NAME`")


def sequence_label_space(values: Sequence, source: str) -> LabelSpace:
    """The label space of a label column: classes, sets of classes or a regression target, by the values' kind."""
    present = [value for value in values if value is not None and value != ""]
    if len(present) < len(values):
        raise DataError(f"{source}: {len(values) - len(present)} rows have no label; fill them in or remove them")
    if all(isinstance(value, list) for value in present):
        if not all(isinstance(item, str) for value in present for item in value):
            raise DataError(f"{source}: a multi-label row is a list of label strings, e.g. [\"sports\", \"politics\"]")
        return LabelSpace(MULTI_LABEL, sorted({item for value in present for item in value}))
    if any(isinstance(value, (list, dict)) for value in present):
        raise DataError(f"{source}: the label column mixes lists and single labels; use one kind for every row")
    if all(_is_number(value) for value in present):
        if any(isinstance(value, float) and not float(value).is_integer() for value in present):
            return LabelSpace(REGRESSION)
        return LabelSpace(SINGLE_LABEL, [class_name(value) for value in sorted(set(present))])
    if all(isinstance(value, (str, bool)) for value in present):
        return LabelSpace(SINGLE_LABEL, sorted({class_name(value) for value in present}))
    kinds = sorted({type(value).__name__ for value in present})
    raise DataError(f"{source}: the label column mixes {', '.join(kinds)} values; use strings (classes) throughout")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def class_name(value) -> str:
    """The name of a class label: integers (also 1.0 from a CSV) as digits, anything else as its text."""
    return str(int(value)) if _is_number(value) else str(value)


def encode_sequence_label(value, space: LabelSpace) -> int | float | list[float]:
    if space.problem_type == REGRESSION:
        return float(value)
    if space.problem_type == MULTI_LABEL:
        chosen = set(value)
        return [1.0 if name in chosen else 0.0 for name in space.names]
    return space.label2id[class_name(value)]


def tag_label_space(tag_rows: Sequence[Sequence[str]], source: str) -> LabelSpace:
    """`O` and every `B-X` / `I-X` seen, `O` first; both B- and I- of every entity type, so either can be predicted."""
    types = set()
    for tags in tag_rows:
        for tag in tags:
            if tag == "O":
                continue
            prefix, _, kind = tag.partition("-")
            if prefix not in ("B", "I") or not kind:
                raise DataError(f"{source}: tag {tag!r} is not BIO; tags are O, B-TYPE or I-TYPE (e.g. B-PER, I-PER)")
            types.add(kind)
    return LabelSpace(None, ["O"] + [f"{prefix}-{kind}" for kind in sorted(types) for prefix in ("B", "I")])


# ---- sequence rows -----------------------------------------------------------------------------------------------------
def sequence_ids(text_ids: Sequence[int], max_seq_len: int, gmask_id: int, sop_id: int) -> list[int]:
    """`text [gMASK] <sop>`, the text cut at its end to fit `max_seq_len` (the head reads `<sop>`)."""
    return [*text_ids[: max_seq_len - 2], gmask_id, sop_id]


def _sequence_rows(batch, *, tokenizer, text_column, label_column, space, max_seq_len, num_threads) -> dict:
    gmask, sop, _ = layout_ids(tokenizer)
    texts = [text_or_empty(text) for text in batch[text_column]]
    ids = tokenizer.encode_text(texts, num_threads)
    return {
        "input_ids": [sequence_ids(row, max_seq_len, gmask, sop) for row in ids],
        "labels": [encode_sequence_label(value, space) for value in batch[label_column]],
        "truncated": [len(row) > max_seq_len - 2 for row in ids],
    }


def encode_sequence_dataset(dataset, tokenizer, *, text_column: str, label_column: str, space: LabelSpace,
                            max_seq_len: int, num_proc: int | None = None) -> datasets.Dataset:
    """`input_ids` (`text [gMASK] <sop>`) and `labels` (class id, multi-hot floats or a float) for every row."""
    label_feature = {
        SINGLE_LABEL: datasets.Value("int64"),
        MULTI_LABEL: datasets.Sequence(datasets.Value("float32")),
        REGRESSION: datasets.Value("float32"),
    }[space.problem_type]
    features = datasets.Features({"input_ids": TOKEN_IDS, "labels": label_feature,
                                  "truncated": datasets.Value("bool")})
    rows = cached_map(
        dataset, _sequence_rows, features, tokenizer, num_proc, desc=f"Tokenizing `{text_column}`",
        fn_kwargs={"tokenizer": tokenizer, "text_column": text_column, "label_column": label_column, "space": space,
                   "max_seq_len": max_seq_len, "num_threads": sentencepiece_threads(num_proc)},
        key={"step": "seq_cls rows", "text_column": text_column, "label_column": label_column,
             "space": [space.problem_type, space.names], "max_seq_len": max_seq_len},
    )
    truncated = sum(rows["truncated"])
    if truncated:
        logger.warning("cut the end of %d of %d texts longer than max_seq_len=%d", truncated, len(rows), max_seq_len)
    return rows.remove_columns("truncated")


# ---- token rows: BIO tags of tokens <-> sentencepiece pieces -----------------------------------------------------------
@dataclass
class TokenAlignment:
    """One row's pieces and how they meet its tokens.

    piece_token[p]: the first token piece p overlaps (None: a piece of no token, such as a space or sentencepiece's
    leading `▁`); piece_inside[p]: p starts after that token's first character. token_piece[t]: the piece holding
    token t's first character (None: an empty token, or one cut by max_seq_len); token_leads[t]: t is the first token
    of that piece.
    """

    input_ids: list[int]
    piece_token: list[int | None]
    piece_inside: list[bool]
    token_piece: list[int | None]
    token_leads: list[bool]


def join_tokens(tokens: Sequence[str]) -> tuple[str, list[tuple[int, int]]]:
    """The text of the tokens and each token's UTF-8 byte span in it (sentencepiece reports byte offsets)."""
    parts, spans, position = [], [], 0
    for index, token in enumerate(tokens):
        if index and parts and _word_char(parts[-1][-1:]) and _word_char(token[:1]):
            parts.append(" ")
            position += 1
        size = len(token.encode("utf-8"))
        spans.append((position, position + size))
        parts.append(token)
        position += size
    return "".join(parts), spans


def _word_char(char: str) -> bool:
    return char.isascii() and char.isalnum()


def align_tokens(tokenizer, tokens: Sequence[str], max_seq_len: int) -> TokenAlignment:
    """Pieces of the joined tokens (at most `max_seq_len - 2`), with the token of each piece and the piece of each
    token; `input_ids` ends with `[gMASK] <sop>`."""
    normalized = [tokenizer.normalize_text(str(token)) for token in tokens]  # GLM's newline / tab / blank pieces
    text, spans = join_tokens(normalized)
    pieces = tokenizer.sp_model.encode(text, return_type="proto").pieces[: max_seq_len - 2]
    gmask, sop, _ = layout_ids(tokenizer)
    piece_token: list[int | None] = []
    piece_inside: list[bool] = []
    token_piece: list[int | None] = [None] * len(spans)
    token_leads = [False] * len(spans)
    cursor = 0
    for index, piece in enumerate(pieces):
        while cursor < len(spans) and spans[cursor][1] <= piece.begin:
            cursor += 1
        first = None
        for token in range(cursor, len(spans)):
            start, end = spans[token]
            if start >= piece.end:
                break
            if end > start and end > piece.begin:  # the token overlaps the piece
                if first is None:
                    first = token
                if piece.begin <= start:  # the token's first character is in this piece
                    token_piece[token], token_leads[token] = index, token == first
        piece_token.append(first)
        piece_inside.append(first is not None and piece.begin > spans[first][0])
    ids = [piece.id + tokenizer.num_image_tokens for piece in pieces]
    return TokenAlignment([*ids, gmask, sop], piece_token, piece_inside, token_piece, token_leads)


def continuation(tag: str) -> str:
    """The tag of text that continues a piece tagged `tag`: inside the same entity, or outside any."""
    return "O" if tag == "O" else "I-" + tag.partition("-")[2]


def piece_tags(alignment: TokenAlignment, tags: Sequence[str]) -> list[str | None]:
    """The tag of every piece from the tags of the tokens (None: a piece of no token, which takes no loss)."""
    return [
        None if token is None else continuation(tags[token]) if inside else tags[token]
        for token, inside in zip(alignment.piece_token, alignment.piece_inside)
    ]


def token_tags(alignment: TokenAlignment, tags_of_pieces: Sequence[str | None]) -> list[str]:
    """The tag of every token from the tags of the pieces: what a prediction means for the user's tokens."""
    result = []
    for piece, leads in zip(alignment.token_piece, alignment.token_leads):
        tag = tags_of_pieces[piece] if piece is not None else None
        result.append("O" if tag is None else tag if leads else continuation(tag))
    return result


def entities(tags: Sequence[str]) -> set[tuple[str, int, int]]:
    """(type, start, end) of every entity in a BIO sequence; an I-X that continues no X starts one (conlleval)."""
    found, kind, start = set(), None, 0
    for index, tag in enumerate([*tags, "O"]):
        prefix, _, tag_type = tag.partition("-")
        if kind is not None and (prefix != "I" or tag_type != kind):
            found.add((kind, start, index))
            kind = None
        if prefix == "B" or (prefix == "I" and kind is None):
            kind, start = tag_type, index
    return found


def _token_rows(batch, *, tokenizer, tokens_column, tags_column, space, max_seq_len) -> dict:
    label2id = space.label2id
    input_ids, labels, lossy = [], [], []
    for tokens, tags in zip(batch[tokens_column], batch[tags_column]):
        tokens, tags = list(tokens or []), list(tags or [])
        alignment = align_tokens(tokenizer, tokens, max_seq_len)
        per_piece = piece_tags(alignment, tags)
        input_ids.append(alignment.input_ids)
        labels.append([IGNORE_INDEX if tag is None else label2id[tag] for tag in per_piece] + [IGNORE_INDEX] * 2)
        lossy.append(token_tags(alignment, per_piece) != tags)
    return {"input_ids": input_ids, "labels": labels, "lossy": lossy}


def check_token_rows(dataset, tokens_column: str, tags_column: str, source: str) -> None:
    """Every row holds a list of tokens and a list of as many tags (JSON / JSONL: a CSV cell cannot hold a list)."""
    for index, (tokens, tags) in enumerate(zip(dataset[tokens_column], dataset[tags_column]), 1):
        for column, value in ((tokens_column, tokens), (tags_column, tags)):
            if not isinstance(value, list):
                raise DataError(
                    f"{source}: row {index}: `{column}` holds {str(value)[:40]!r}, not a list. Write token_cls rows "
                    'as JSON lines: {"tokens": ["张", "三"], "tags": ["B-PER", "I-PER"]}'
                )
        if not all(isinstance(tag, str) for tag in tags):
            raise DataError(
                f"{source}: row {index}: `{tags_column}` holds {str(tags)[:40]!r}; tags are BIO strings (O, B-PER, "
                "I-PER), not ids: write the tag names"
            )
        if len(tokens) != len(tags):
            raise DataError(
                f"{source}: row {index} has {len(tokens)} tokens but {len(tags)} tags; give `{tags_column}` one tag "
                f"per token of `{tokens_column}`"
            )


def encode_token_dataset(dataset, tokenizer, *, tokens_column: str, tags_column: str, space: LabelSpace,
                         max_seq_len: int, num_proc: int | None = None, source: str = "the data") -> datasets.Dataset:
    """`input_ids` (`pieces [gMASK] <sop>`) and per-piece `labels` (-100 on `[gMASK]`, `<sop>` and pieces of no
    token) for every row."""
    check_token_rows(dataset, tokens_column, tags_column, source)
    features = datasets.Features({"input_ids": TOKEN_IDS, "labels": TOKEN_IDS, "lossy": datasets.Value("bool")})
    rows = cached_map(
        dataset, _token_rows, features, tokenizer, num_proc, desc=f"Aligning `{tags_column}` with pieces",
        fn_kwargs={"tokenizer": tokenizer, "tokens_column": tokens_column, "tags_column": tags_column,
                   "space": space, "max_seq_len": max_seq_len},
        key={"step": "token_cls rows", "tokens_column": tokens_column, "tags_column": tags_column,
             "space": space.names, "max_seq_len": max_seq_len},
    )
    lossy = sum(rows["lossy"])
    if lossy:
        logger.warning(
            "%d of %d rows have tags the pieces cannot carry exactly (an entity boundary inside a sentencepiece "
            "piece, or tokens cut at max_seq_len=%d); they train on the nearest piece tags", lossy, len(rows),
            max_seq_len,
        )
    return rows.remove_columns("lossy")
