"""Reading a run's data sources into canonical rows, file by file, and mixing their samples.

Each file is loaded alone (`load_raw_dataset`) and bound to its format on its own columns (`formats`), so a folder
whose files name their columns differently, or a stream whose files carry different extra columns, reads as one
dataset: only the columns a format uses are read, and each file becomes the same canonical rows.

Nothing is dropped without a word: a file without a column its format needs stops the run (`DataError`, naming the
file and its columns); a column that no role reads is named in one warning; a row the format cannot convert is
skipped and counted with its file and row named (`on_bad_row: skip`), or stops the run (`on_bad_row: error`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence

import datasets
import pyarrow.compute as pc

from ..models.prompt import build_prompt
from .formats import FORMATS, BadRow, FormatBinding, SourceSpec, get_format
from .loading import DataError, load_raw_dataset, resolve_data_files, setting_names
from .processing import dataset_columns

logger = logging.getLogger("thuglm.data")

NORMALIZE_VERSION = 1  # bump when the canonical rows change, so that old cache files are not reused
MAP_BATCH_SIZE = 1000
ROWS_NAMED = 10


def load_source(
    spec: SourceSpec, *, streaming: bool = False, cache_dir: str | None = None, bad_rows: str = "skip",
    training: bool = True, num_proc: int | None = None,
):
    """The canonical rows of every file of `spec` (text or dialogue, see `formats`), bad rows marked by `problem`.

    Without streaming, bad rows are counted and named here (or stop the load with `bad_rows="error"`); a stream
    reports them batch by batch as it is read.
    """
    fmt = get_format(spec.format)
    parts, unused = [], {}
    for file in resolve_data_files(list(spec.files)):
        raw = load_raw_dataset(str(file), streaming=streaming, cache_dir=cache_dir, encoding=spec.encoding,
                               bad_rows=bad_rows, field=spec.field, txt_unit=spec.txt_unit)
        names = dataset_columns(raw)
        try:
            binding = fmt.bind(spec, names, str(file), training=training)
        except DataError as error:
            nested = None if streaming or spec.field else _records_key(raw)
            if nested is None:
                raise
            raise DataError(f"{error} The file holds its records under the key {nested!r}: set data.field={nested} "
                            "to read them.") from None
        for column in names:
            if column not in binding.used:
                unused.setdefault(column, []).append(file.name)
        parts.append(_normalize(raw, binding, str(file), names, bad_rows=bad_rows, streaming=streaming,
                                num_proc=num_proc))
    if unused:
        _warn_unused(spec, fmt, binding, unused)
    canonical = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    if spec.max_samples is not None:
        canonical = _first_rows(canonical, spec.max_samples, spec, streaming)
    return canonical


def _records_key(raw) -> str | None:
    """The key of a JSON file that is one object holding a list of records (`{"data": [{...}, ...]}`), or None."""
    if len(raw) != 1:
        return None
    row = raw[0]
    for key, value in row.items():
        if isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
            return key
    return None


def guess_dialogue_spec(path) -> SourceSpec | None:
    """A sharegpt reading of a prompt file whose rows hold a list of messages (for a model without run settings)."""
    raw = load_raw_dataset(str(path))
    names = raw.column_names or []
    if any(name in names for name in ("conversations", "messages", "conversation")) and "prompt" not in names:
        return SourceSpec(files=(str(path),), format="sharegpt")
    return None


def _normalize(raw, binding: FormatBinding, source: str, names: list[str], *, bad_rows: str, streaming: bool,
               num_proc: int | None):
    features = FORMATS[binding.format].features_of(binding)
    kwargs = {"binding": binding, "source": source, "bad_rows": bad_rows, "streaming": streaming}
    raw = raw.select_columns(binding.used)  # a stream then reads only these, whatever else a file holds
    if streaming:
        return raw.map(_normalize_batch, batched=True, batch_size=MAP_BATCH_SIZE, with_indices=True,
                       remove_columns=binding.used, features=features, fn_kwargs=kwargs)
    key = {"input": raw._fingerprint, "binding": repr(binding), "version": NORMALIZE_VERSION}
    canonical = raw.map(
        _normalize_batch, batched=True, batch_size=MAP_BATCH_SIZE, with_indices=True, remove_columns=binding.used,
        features=features, fn_kwargs=kwargs, num_proc=num_proc if num_proc and len(raw) >= 2 * num_proc else None,
        new_fingerprint=hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32],
        desc=f"Reading {binding.format} rows",
    )
    report_problems(canonical, source, bad_rows)
    return canonical


def _normalize_batch(batch, indices, *, binding: FormatBinding, source: str, bad_rows: str, streaming: bool) -> dict:
    fmt = FORMATS[binding.format]
    features = fmt.features_of(binding)
    empty = {name: [] if name == "turns" else "" for name in features if name != "problem"}
    out = {name: [] for name in features}
    problems = []
    for index, values in zip(indices, zip(*batch.values())):
        try:
            row, problem = binding.convert(dict(zip(batch, values))), ""
        except BadRow as error:
            row, problem = empty, f"{error.reason}{_DETAIL}{error.detail}"
            problems.append(f"row {index + 1}: {error.detail}")
        for name, value in row.items():
            out[name].append(value if name != "system" else value or "")
        out["problem"].append(problem)
    if streaming and problems:  # a stream is reported as it is read
        if bad_rows == "error":
            raise DataError(f"{source}: {problems[0]}. {_FIX}")
        logger.warning("%s: skipped %d row(s) in one streamed batch: %s", source, len(problems),
                       "; ".join(problems[:ROWS_NAMED]))
    return out


_FIX = "Fix the row, or set data.on_bad_row=skip to skip such rows (they are counted and named in the log)."


_DETAIL = "\x1f"  # between a problem's reason (by which rows are counted) and its detail (the first row's value)


def report_problems(canonical: datasets.Dataset, source: str, bad_rows: str) -> int:
    """Count the rows of `canonical` that became no sample; warn naming them, or raise with `bad_rows="error"`."""
    column = canonical.data.column("problem")
    flags = pc.not_equal(column, "")
    count = pc.sum(flags).as_py() or 0
    if not count:
        return 0
    indices = pc.indices_nonzero(flags).to_pylist()
    if bad_rows == "error":
        reason, _, detail = column[indices[0]].as_py().partition(_DETAIL)
        raise DataError(f"{source}: row {indices[0] + 1}: {detail} ({count} such row(s) in the file). {_FIX}")
    by_reason: dict[str, list[int]] = {}
    for index in indices:
        by_reason.setdefault(column[index].as_py().partition(_DETAIL)[0], []).append(index + 1)
    for reason, rows in by_reason.items():
        named = ", ".join(map(str, rows[:ROWS_NAMED])) + (", ..." if len(rows) > ROWS_NAMED else "")
        logger.warning("%s: skipped %d row(s) whose %s (%s %s)", source, len(rows), reason,
                       "row" if len(rows) == 1 else "rows", named)
    logger.warning("%s: skipped %d of %d rows in all; data.on_bad_row=error stops at the first instead", source, count,
                   len(canonical))
    return count


def _warn_unused(spec: SourceSpec, fmt, binding: FormatBinding, unused: dict[str, list[str]]) -> None:
    columns = ", ".join(f"`{column}` ({', '.join(files[:3])}{' ...' if len(files) > 3 else ''})"
                        for column, files in unused.items())
    hint = fmt.unused_hint(binding, list(unused))
    outcome = setting_names().unread_columns
    logger.warning("%s: column(s) %s read by nothing with data.format=%s: %s. %s", spec.describe(), columns,
                   spec.format, outcome, hint or "Map them with data.columns if they hold what should be read.")


def _first_rows(canonical, count: int, spec: SourceSpec, streaming: bool):
    if streaming:
        return canonical.take(count)
    if count < len(canonical):
        logger.info("%s: max_samples=%d of its %d rows", spec.describe(), count, len(canonical))
        return canonical.select(range(count))
    return canonical


def mix_samples(parts: Sequence, weights: Sequence[float | None], seed: int, names: Sequence[str] = ()):
    """One dataset of the samples of every source: concatenated, or interleaved by weight when any is given.

    Interleaving draws each sample's source with probability weight / sum of weights until every source has given
    all its samples at least once (`all_exhausted`): a source with a larger weight than its size repeats, and no
    sample of any source is left out.
    """
    if len(parts) == 1:
        return parts[0]
    if all(weight is None for weight in weights):
        return datasets.concatenate_datasets(list(parts))
    values = [1.0 if weight is None else float(weight) for weight in weights]
    total = sum(values)
    mixed = datasets.interleave_datasets(list(parts), probabilities=[value / total for value in values], seed=seed,
                                         stopping_strategy="all_exhausted")
    if not isinstance(mixed, datasets.IterableDataset):
        sizes = ", ".join(f"{name or i}: {len(part)}" for i, (name, part) in enumerate(zip(names, parts)))
        logger.info("mixed %d sources by weight %s into %d samples (samples a source: %s)", len(parts), values,
                    len(mixed), sizes)
    return mixed


# ---- prompts for generation and evaluation ----------------------------------------------------------------------------
def prompt_rows(canonical, kind: str) -> list[dict]:
    """{"prompt", "reference"?} for every good canonical row, in order.

    A dialogue's last user turn is asked with the turns before it as history (and its system text); when the
    dialogue ends with an answer, that answer is the reference. A text is a prompt by itself.
    """
    rows = []
    for row in canonical:
        if row["problem"]:
            continue
        if kind == "text":
            rows.append({"prompt": row["text"]})
            continue
        turns = list(row["turns"])
        reference = turns.pop() if len(turns) % 2 == 0 else None
        pairs = list(zip(turns[0:-1:2], turns[1:-1:2]))
        prompt = build_prompt(turns[-1], pairs, row["system"] or None)
        rows.append({"prompt": prompt} if reference is None else {"prompt": prompt, "reference": reference})
    return rows
