"""Answer a file of prompts in batches, the way `model.chat` answers one.

Prompts are padded on the left (the tokenizer does this and returns GLM's 2D position ids), generated together, cut
at the end token and post-processed with `process_response`, so under greedy decoding every answer equals
`model.chat(tokenizer, prompt, do_sample=False)`'s.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from transformers import LogitsProcessorList, PreTrainedModel, PreTrainedTokenizerBase

from ..data import DataError, alpaca_query
from ..models.modeling_chatglm import InvalidScoreLogitsProcessor
from .chat import answer_token_ids, build_prompt, process_response


def prompt_row(row: dict, source: str) -> dict:
    """{"prompt", "reference"?} from a `prompt` row or an alpaca row (instruction / input / history / output)."""
    if row.get("prompt") is not None:
        prompt = row["prompt"]
    elif row.get("instruction") is not None:
        history = [tuple(turn) for turn in row.get("history") or []]
        prompt = build_prompt(alpaca_query(row), history)
    else:
        raise DataError(f"{source}: a row needs a `prompt` or an `instruction` field; got {sorted(row)}")
    reference = row.get("reference") if row.get("reference") is not None else row.get("output")
    return {"prompt": prompt} if reference is None else {"prompt": prompt, "reference": reference}


def read_json_rows(path: Path) -> list[tuple[str, dict]]:
    """(where, row) pairs from a .json list or a .jsonl file, `where` naming the row for error messages."""
    text = path.read_text(encoding="utf-8-sig")
    try:
        if path.suffix == ".jsonl":
            lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
            rows = [(f"{path}:{n}", json.loads(line)) for n, line in lines]
        else:
            try:
                rows = json.loads(text)
            except json.JSONDecodeError as error:
                if not error.msg.startswith("Extra data"):
                    raise
                lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
                rows = [json.loads(line) for _, line in lines]  # JSON lines in a .json file, as `datasets` reads them
            if not isinstance(rows, list):
                raise DataError(f"{path} holds a JSON {type(rows).__name__}: a .json prompt file is a list of rows")
            rows = [(f"{path} row {n}", row) for n, row in enumerate(rows)]
    except json.JSONDecodeError as error:
        raise DataError(f"{path} is not valid JSON ({error})") from None
    for where, row in rows:
        if not isinstance(row, dict):
            raise DataError(f"{where}: a row is a JSON object with a `prompt` or `instruction` field")
    return rows


def read_prompts(path: str | Path) -> list[dict]:
    """Rows {"prompt": ..., "reference"?: ...} from a .txt (one prompt a line), .json (a list) or .jsonl file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"prompt file {path} does not exist")
    if path.suffix == ".txt":
        lines = path.read_text(encoding="utf-8-sig").splitlines()
        return [{"prompt": line} for line in lines if line.strip()]
    if path.suffix in (".json", ".jsonl"):
        return [prompt_row(row, where) for where, row in read_json_rows(path)]
    raise DataError(f"{path}: prompts are read from .txt (one a line), .json (a list of rows) or .jsonl files")


def read_prompts_as(spec, path: str | Path | Sequence[str | Path], bad_rows: str = "skip") -> list[dict]:
    """Rows {"prompt", "reference"?} of `path` read with a run's data settings (`spec`, a `SourceSpec`: its format,
    columns, tags, ...), as training read that run's files.

    A dialogue's last user turn is asked with the turns before it as history (and the row's system text first);
    `reference` is the answer that follows it in the row, where there is one (alpaca's response column, a
    dialogue's last assistant turn). A text is a prompt by itself. A file of `prompt` rows is read as before.
    """
    import dataclasses

    from ..data.formats import get_format
    from ..data.loading import load_raw_dataset
    from ..data.sources import load_source, prompt_rows

    paths = [path] if isinstance(path, (str, Path)) else list(path)
    if len(paths) == 1 and Path(paths[0]).suffix == ".txt" and spec.format != "text":
        return read_prompts(paths[0])
    if len(paths) == 1 and "prompt" in (load_raw_dataset(str(paths[0])).column_names or []) and spec.format != "text":
        return read_prompts(paths[0])
    spec = dataclasses.replace(spec, files=tuple(str(p) for p in paths))
    canonical = load_source(spec, training=False, bad_rows=bad_rows)
    return prompt_rows(canonical, get_format(spec.format).kind)


@torch.no_grad()
def generate_batch(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], **generate_kwargs
) -> list[str]:
    inputs = tokenizer(list(prompts), padding=True, return_tensors="pt").to(model.device)
    # The official chat's guard against fp16 overflow, so that answers match `model.chat` in every dtype.
    processors = LogitsProcessorList([InvalidScoreLogitsProcessor()])
    # On CUDA: a static cache and a compiled decode step (same tokens; see ChatGLMForConditionalGeneration).
    fast = getattr(model, "fast_decoding_kwargs", None)
    if fast is not None:
        generate_kwargs = {**fast(inputs["input_ids"].shape[1], generate_kwargs), **generate_kwargs}
    outputs = model.generate(**inputs, logits_processor=processors, **generate_kwargs)
    end_ids = model.generation_config.eos_token_id
    answers = outputs[:, inputs["input_ids"].shape[1] :].tolist()
    return [process_response(tokenizer.decode(answer_token_ids(answer, end_ids))) for answer in answers]


def generate_responses(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    batch_size: int = 8,
    max_new_tokens: int = 256,
    do_sample: bool = False,
    top_p: float = 0.7,
    temperature: float = 0.95,
) -> list[str]:
    """One answer per prompt (a prompt is the text `chat` would build: `build_prompt(query, history)`).

    Prompts are batched by length, so a batch carries little padding; the answers come back in the input order.
    """
    sampling = {"top_p": top_p, "temperature": temperature} if do_sample else {}
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers: dict[int, str] = {}
    for start in range(0, len(order), batch_size):
        indices = order[start : start + batch_size]
        batch = generate_batch(
            model, tokenizer, [prompts[i] for i in indices], max_new_tokens=max_new_tokens, do_sample=do_sample, **sampling
        )
        answers.update(zip(indices, batch))
    return [answers[i] for i in range(len(prompts))]


def write_jsonl(rows: Iterable[dict], path: str | Path) -> Path:
    """One JSON object a line, UTF-8 with Chinese kept readable (ensure_ascii off)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    return path
