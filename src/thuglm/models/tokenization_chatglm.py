"""ChatGLM-6B tokenizer: sentencepiece (`ice_text.model`) plus GLM's text preprocessing and special tokens.

Gives the same ids as the official `tokenization_chatglm.py`, without remote code. Layout of an encoded text:

    single text:  text [gMASK] <sop>
    pair:         a [gMASK] <sop> b <eop>

Batches are padded on the left, and every encoding carries `position_ids` of shape [2, seq] (GLM's position and
block position) next to a 2D `attention_mask`; see `thuglm.models.masking` for how the model turns them into the
prefix-LM mask.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Sequence

import sentencepiece as spm
from transformers.tokenization_python import PreTrainedTokenizer
from transformers.tokenization_utils_base import BatchEncoding, EncodedInput
from transformers.utils import PaddingStrategy

LINEBREAK_TOKEN = "<n>"
TAB_TOKEN = "<|tab|>"
MAX_BLANK_LENGTH = 80
BLANK_TOKENS = [f"<|blank_{n}|>" for n in range(2, MAX_BLANK_LENGTH + 1)]
CHATGLM_SPECIAL_TOKENS = ["[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>"]

# Runs of 2..80 spaces, longest first from the left: the same split as the official loop that replaces runs of
# 80, 79, ..., 2 spaces in turn, done in one pass.
_BLANK_RUN = re.compile(" {2,%d}" % MAX_BLANK_LENGTH)
_BLANK_TOKEN = re.compile(r"<\|blank_(\d+)\|>")


def preprocess_text(text: str) -> str:
    """GLM's text preprocessing before sentencepiece: newlines, tabs and runs of spaces become pieces."""
    text = text.replace("\n", LINEBREAK_TOKEN).replace("\t", TAB_TOKEN)
    return _BLANK_RUN.sub(lambda run: f"<|blank_{len(run.group())}|>", text)


# transformers 4.x's `clean_up_tokenization`, in its order: what decode joins (a streamer must hold back a tail that
# may still become one of these).
CLEANUP_REPLACEMENTS = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                        (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


def clean_up_tokenization(text: str) -> str:
    """transformers' classic `clean_up_tokenization` (4.x), which the official tokenizer's decode applied by default
    (`clean_up_tokenization_spaces` was True then): `don't , do it . right ?` -> `don't, do it. right?`."""
    for spaced, joined in CLEANUP_REPLACEMENTS:
        text = text.replace(spaced, joined)
    return text


def postprocess_text(text: str) -> str:
    """Undo `preprocess_text` on decoded text."""
    text = text.replace(LINEBREAK_TOKEN, "\n").replace(TAB_TOKEN, "\t")

    def spaces(match: re.Match) -> str:
        length = int(match.group(1))
        return " " * length if 2 <= length <= MAX_BLANK_LENGTH else match.group(0)

    return _BLANK_TOKEN.sub(spaces, text)


class ChatGLMTokenizer(PreTrainedTokenizer):
    """Tokenizer for ChatGLM-6B, reading the official `ice_text.model` and `tokenizer_config.json`.

    `num_image_tokens` is the offset the first ChatGLM-6B release put before the text ids (20,000); the current
    release's `tokenizer_config.json` sets it to 0.
    """

    vocab_files_names = {"vocab_file": "ice_text.model"}
    model_input_names = ["input_ids", "attention_mask", "position_ids"]
    padding_side = "left"

    def __init__(
        self,
        vocab_file: str,
        do_lower_case: bool = False,
        remove_space: bool = False,
        bos_token: str = "<sop>",
        eos_token: str = "<eop>",
        end_token: str = "</s>",
        mask_token: str = "[MASK]",
        gmask_token: str = "[gMASK]",
        padding_side: str = "left",
        pad_token: str = "<pad>",
        unk_token: str = "<unk>",
        num_image_tokens: int = 20000,
        **kwargs,
    ) -> None:
        if padding_side != "left":
            raise ValueError(
                "ChatGLM is trained with left padding (its positions count from the first real token); "
                f"got padding_side={padding_side!r}. Leave padding_side at 'left'."
            )
        self.vocab_file = vocab_file
        self.sp_model = spm.SentencePieceProcessor(model_file=vocab_file)
        self.num_image_tokens = num_image_tokens
        self.do_lower_case = do_lower_case
        self.remove_space = remove_space
        self.end_token = end_token
        self.gmask_token = gmask_token
        # The official tokenizer decoded with transformers 4.x's default, True (a caller may still pass False).
        kwargs.setdefault("clean_up_tokenization_spaces", True)
        super().__init__(
            do_lower_case=do_lower_case,
            remove_space=remove_space,
            padding_side=padding_side,
            bos_token=bos_token,
            eos_token=eos_token,
            end_token=end_token,
            mask_token=mask_token,
            gmask_token=gmask_token,
            pad_token=pad_token,
            unk_token=unk_token,
            num_image_tokens=num_image_tokens,
            **kwargs,
        )

    # ---- vocabulary -------------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.num_image_tokens + self.sp_model.get_piece_size()

    def get_vocab(self) -> dict[str, int]:
        return {self._convert_id_to_token(i): i for i in range(self.vocab_size)}

    def convert_tokens_to_ids(self, tokens):
        # One sentencepiece call for the whole list: the per-token Python path dominates batch encoding otherwise.
        # It is exact while every added token is a piece of ice_text.model (the special tokens are).
        if isinstance(tokens, str) or not self._added_tokens_are_pieces():
            return super().convert_tokens_to_ids(tokens)
        if self.num_image_tokens == 0:
            return self.sp_model.piece_to_id(list(tokens))
        return [self._convert_token_to_id(token) for token in tokens]

    def _added_tokens_are_pieces(self) -> bool:
        added = tuple(self._added_tokens_encoder.items())
        if getattr(self, "_checked_added_tokens", None) != added:
            self._added_are_pieces = all(self._convert_token_to_id(token) == index for token, index in added)
            self._checked_added_tokens = added
        return self._added_are_pieces

    def _convert_token_to_id(self, token: str) -> int:
        if token.startswith("<image_") and token.endswith(">") and token[7:-1].isdigit():
            return int(token[7:-1])
        return self.sp_model.piece_to_id(token) + self.num_image_tokens

    def _convert_id_to_token(self, index: int) -> str:
        if index < self.num_image_tokens:
            return f"<image_{index}>"
        if index >= self.vocab_size:  # the model's vocabulary is padded beyond the tokenizer's (130,528 > 130,344)
            return str(self.unk_token)
        return self.sp_model.id_to_piece(index - self.num_image_tokens)

    @property
    def gmask_token_id(self) -> int:
        return self._layout_ids[0]

    @property
    def end_token_id(self) -> int:
        return self._convert_token_to_id(self.end_token)

    # ---- text <-> tokens -----------------------------------------------------------------------------------
    def normalize_text(self, text: str) -> str:
        """The text as sentencepiece reads it: spaces collapsed and lower case where the tokenizer's settings say so,
        newlines, tabs and runs of blanks as GLM's own pieces. Token classification aligns its tags on this."""
        if self.remove_space:
            text = " ".join(text.strip().split())
        if self.do_lower_case:
            text = text.lower()
        return preprocess_text(text)

    def tokenize(self, text: str, **kwargs) -> list[str]:
        # As the official tokenizer under the transformers it was written for (4.27; 4.33 the same), loaded with
        # from_pretrained: the text is split at the literal strings of its special tokens (<sop>, <eop>, [MASK],
        # <pad>, <unk>), which become those tokens, the whitespace next to them is stripped, and each piece of text
        # between them goes to sentencepiece on its own (with its own leading ▁). Other GLM tokens ([gMASK],
        # [sMASK], ...) are pieces of ice_text.model and come out whole inside the text, spaces around them kept.
        # Only tokens added on top of the vocabulary need the added-token splitting of the base class.
        if not self._added_tokens_are_pieces():
            return super().tokenize(text, **kwargs)
        tokens: list[str] = []
        for part, special in self._split_on_special_tokens(text):
            tokens += [part] if special else self._tokenize(part)
        return tokens

    @property
    def _official_split_tokens(self) -> tuple[str, ...]:
        """The official tokenizer's `all_special_tokens`: its bos, eos, unk, pad and mask tokens ([gMASK] is not)."""
        return tuple(str(t) for t in (self.bos_token, self.eos_token, self.unk_token, self.pad_token, self.mask_token)
                     if t is not None)

    def _split_on_special_tokens(self, text: str) -> list[tuple[str, bool]]:
        """(part, is_special) in order, as transformers 4.27's `tokenize` splits: empty parts dropped, whitespace
        stripped on both sides of each special token."""
        key = self._official_split_tokens
        if getattr(self, "_split_key", None) != key:
            alternatives = "|".join(re.escape(token) for token in sorted(set(key), key=len, reverse=True))
            self._split_pattern = re.compile(f"({alternatives})")
            self._split_key = key
        parts = self._split_pattern.split(text)  # text, special, text, special, ..., text
        for i in range(1, len(parts), 2):
            parts[i - 1] = parts[i - 1].rstrip()
            parts[i + 1] = parts[i + 1].lstrip()
        return [(part, i % 2 == 1) for i, part in enumerate(parts) if part]

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return self.sp_model.encode(self.normalize_text(text), out_type=str)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return postprocess_text(self.sp_model.decode_pieces(tokens))

    def _decode(self, token_ids, skip_special_tokens: bool = False, **kwargs) -> str:
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        special = set(self.all_special_ids) if skip_special_tokens else set()
        text_ids = range(self.num_image_tokens, self.vocab_size)
        pieces: list[str] = []
        run: list[int] = []  # consecutive sentencepiece ids, decoded together
        for index in map(int, token_ids):
            # Like the official tokenizer: padding is never text, and image ids decode to nothing; nor do ids in
            # the model's padded vocabulary rows. Tokens added on top of ice_text.model decode to their text.
            if index == self.pad_token_id or index in special:
                continue
            if index in text_ids:
                run.append(index - self.num_image_tokens)
            elif index in self._added_tokens_decoder:
                pieces += [self.sp_model.decode(run), self._added_tokens_decoder[index].content]
                run = []
        pieces.append(self.sp_model.decode(run))
        text = postprocess_text("".join(pieces))
        clean = kwargs.get("clean_up_tokenization_spaces")
        if clean if clean is not None else self.clean_up_tokenization_spaces:
            text = clean_up_tokenization(text)
        return text

    def encode_text(self, texts: Sequence[str], num_threads: int = -1) -> list[list[int]]:
        """Ids of many plain texts at once (no special tokens), in sentencepiece's batched C++ encoder.

        Equal to `tokenizer(text, add_special_tokens=False)["input_ids"]` (special-token strings in the text
        included, as in the official tokenizer) unless tokens were added on top of ice_text.model; this is the fast
        path for corpora. `num_threads` -1 uses every core.
        """
        pieces = self.sp_model.encode([self.normalize_text(text) for text in texts], num_threads=num_threads)
        if self.num_image_tokens:
            pieces = [[i + self.num_image_tokens for i in ids] for ids in pieces]
        # A text holding a special token's literal string is split there (see `tokenize`): the slow path, exact.
        for index, text in enumerate(texts):
            if self._split_pattern_hits(text):
                pieces[index] = self.convert_tokens_to_ids(self.tokenize(text))
        return pieces

    def _split_pattern_hits(self, text: str) -> bool:
        self._split_on_special_tokens("")  # builds the pattern for the current special tokens
        return self._split_pattern.search(text) is not None

    # ---- special tokens and padding ---------------------------------------------------------------------------
    @property
    def _layout_ids(self) -> tuple[int, int, int]:
        """([gMASK], <sop>, <eop>) ids, looked up once: they are needed for every encoded text."""
        key = (self.gmask_token, str(self.bos_token), str(self.eos_token))
        if getattr(self, "_layout_key", None) != key:
            self._layout_cache = tuple(self._convert_token_to_id(token) for token in key)
            self._layout_key = key
        return self._layout_cache

    def build_inputs_with_special_tokens(self, token_ids_0: list[int], token_ids_1: list[int] | None = None):
        gmask, sop, eop = self._layout_ids
        ids = token_ids_0 + [gmask, sop]
        if token_ids_1 is not None:
            ids = ids + token_ids_1 + [eop]
        return ids

    def get_special_tokens_mask(self, token_ids_0, token_ids_1=None, already_has_special_tokens=False):
        if already_has_special_tokens:
            special = set(self.all_special_ids) | {self.gmask_token_id}
            return [1 if i in special else 0 for i in token_ids_0]
        mask = [0] * len(token_ids_0) + [1, 1]
        if token_ids_1 is not None:
            mask += [0] * len(token_ids_1) + [1]
        return mask

    def create_token_type_ids_from_sequences(self, token_ids_0, token_ids_1=None):
        return [0] * len(self.build_inputs_with_special_tokens(token_ids_0, token_ids_1))

    def position_ids_for(self, input_ids: Sequence[int]) -> list[list[int]]:
        """GLM's [2, len] position ids of one unpadded sequence.

        The one-sample case of `thuglm.models.masking.glm_position_ids` (which the model uses for batches and
        packed rows), in plain Python because the tokenizer calls it once per text.
        """
        ids = list(input_ids)
        length = len(ids)
        gmask_id, sop_id, _ = self._layout_ids
        context = ids.index(sop_id) if sop_id in ids else length
        mask_id = gmask_id if gmask_id in ids else self.mask_token_id
        position = list(range(length))
        if mask_id in ids:
            position[context:] = [ids.index(mask_id)] * (length - context)
        block = [0] * context + list(range(1, length - context + 1))
        return [position, block]

    def _pad(
        self,
        encoded_inputs: dict[str, EncodedInput] | BatchEncoding,
        max_length: int | None = None,
        padding_strategy: PaddingStrategy = PaddingStrategy.DO_NOT_PAD,
        pad_to_multiple_of: int | None = None,
        padding_side: str | None = None,
        return_attention_mask: bool | None = None,
    ) -> dict:
        if (padding_side or self.padding_side) != "left":
            raise ValueError("ChatGLM inputs are padded on the left; do not pass padding_side='right'.")
        input_ids = encoded_inputs[self.model_input_names[0]]
        # Positions are computed on the unpadded sequence, so padding never shifts them.
        if "position_ids" not in encoded_inputs:
            encoded_inputs["position_ids"] = self.position_ids_for(input_ids)
        position_ids = encoded_inputs.pop("position_ids")
        encoded_inputs = super()._pad(
            encoded_inputs,
            max_length=max_length,
            padding_strategy=padding_strategy,
            pad_to_multiple_of=pad_to_multiple_of,
            padding_side="left",
            return_attention_mask=True if return_attention_mask is None else return_attention_mask,
        )
        difference = len(encoded_inputs[self.model_input_names[0]]) - len(input_ids)
        position_ids = [list(row) for row in position_ids]
        if difference > 0:
            position_ids = [[0] * difference + row for row in position_ids]
        encoded_inputs["position_ids"] = position_ids
        return encoded_inputs

    # ---- saving -----------------------------------------------------------------------------------------------
    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        name = (filename_prefix + "-" if filename_prefix else "") + self.vocab_files_names["vocab_file"]
        out_file = os.path.join(save_directory, name) if os.path.isdir(save_directory) else save_directory
        if os.path.abspath(out_file) != os.path.abspath(self.vocab_file):
            shutil.copyfile(self.vocab_file, out_file)
        return (out_file,)
