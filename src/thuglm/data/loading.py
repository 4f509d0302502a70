"""Finding the user's data files and loading them with Hugging Face `datasets`.

Users point thuglm at files, folders or globs of CSV/TSV/JSON/JSONL/parquet/TXT. Each format is read by its own
`datasets` builder (`load_dataset("csv", data_files=...)`), so the rows land in memory-mapped Arrow files under a
fingerprinted cache (or stream, with `streaming=True`), and the parts are joined with `concatenate_datasets`.
"""

from __future__ import annotations

import codecs
import difflib
import glob
import json
import logging
import os
import re
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

import datasets
from datasets import Value
from datasets.exceptions import DatasetGenerationError
from datasets.features.features import _visit

from ..errors import ThuglmError

logger = logging.getLogger("thuglm.data")

# Extension -> (datasets builder, builder keyword arguments).
FORMATS: dict[str, tuple[str, dict]] = {
    # Text such as "NA" or "null" stays text: no NaN detection in CSV cells (an empty cell is "").
    ".csv": ("csv", {"na_filter": False}),
    ".tsv": ("csv", {"sep": "\t", "na_filter": False}),
    ".json": ("json", {}),
    ".jsonl": ("json", {}),
    ".parquet": ("parquet", {}),
    ".txt": ("text", {}),
}
SUPPORTED_EXTENSIONS = tuple(FORMATS)
COMPRESSIONS = {".gz": "gzip", ".bz2": "bz2", ".xz": "lzma"}
"""A data file may be compressed: `train.jsonl.gz` is read as `.jsonl` (datasets decompresses it)."""
TXT_UNITS = ("line", "paragraph", "document")
"""A sample of a `.txt` file: each line, each blank-line separated paragraph, or the whole file."""
BAD_ROW_POLICIES = ("skip", "error")
"""What to do with a malformed CSV row or a cell that is not text: skip it (counted, with a warning) or stop."""
_GLOB_CHARACTERS = frozenset("*?[")


@dataclass(frozen=True)
class DataSettingNames:
    """How the user of the running command sets each data option, for the messages that ask to change one.

    The defaults are `thuglm train`'s config keys. A command with flags names its flags instead
    (`data_settings_named`), and None where it has no way to set the option: the message then leaves that advice
    out rather than name a key the command does not read.
    """

    files: str | None = "data.files"
    encoding: str | None = "data.encoding=NAME"
    on_bad_row: str | None = "data.on_bad_row={policy}"
    text_column: str | None = "data.text_column=NAME"
    unread_columns: str = "not trained"
    """What becomes of the columns the data format reads nothing from: trained on nowhere, or left out of a command
    that only reads the data (eval, generate)."""


CONFIG_KEYS = DataSettingNames()
_setting_names: ContextVar[DataSettingNames] = ContextVar("thuglm_data_setting_names", default=CONFIG_KEYS)


@contextmanager
def data_settings_named(names: DataSettingNames) -> Iterator[None]:
    """Data messages raised or logged inside the block name the options as `names` does.

    A context rather than an argument: the messages come from deep inside loading and encoding, which the
    commands reach through several layers that have no other use for the wording.
    """
    token = _setting_names.set(names)
    try:
        yield
    finally:
        _setting_names.reset(token)


def setting_names() -> DataSettingNames:
    """How the running command's user sets each data option (see `data_settings_named`)."""
    return _setting_names.get()


def _remove_or_export_again() -> str:
    files = _setting_names.get().files
    return f"Remove it from {files}, or export the data again." if files else "Export the data again."


class DataError(ThuglmError, ValueError):
    """Bad user data. The message names the file (and row / column where it applies) and says how to fix it."""


def resolve_data_files(patterns: str | Sequence[str]) -> list[Path]:
    """The data files that `patterns` name, sorted and de-duplicated, as absolute paths.

    A pattern is a file, a folder (searched recursively: hidden files are skipped, and files of other formats, such
    as a README.md or an .xlsx, are skipped with a warning naming them) or a glob (`data/*.csv`,
    `corpus/**/*.json`). A pattern that matches nothing, or a file named explicitly whose format is not supported,
    is an error: training on fewer files than meant should not pass silently.
    """
    if isinstance(patterns, (str, os.PathLike)):
        patterns = [patterns]
    if not patterns:
        raise DataError("no data files given: name at least one file, folder or glob")
    files = {path for pattern in patterns for path in _resolve_pattern(os.fspath(pattern))}
    return sorted(files)


def _resolve_pattern(pattern: str) -> list[Path]:
    path = Path(pattern).expanduser()
    if path.is_file():
        if not _is_supported(path):
            raise DataError(
                f"{pattern}: unsupported file type {path.suffix or '(no extension)'!r}; supported: "
                f"{', '.join(SUPPORTED_EXTENSIONS)}. Convert the file or rename it if it is one of these formats."
            )
        return [path.absolute()]
    if path.is_dir():
        candidates = [file for file in path.rglob("*") if not _is_hidden(file.relative_to(path))]
        what = "folder"
    elif _GLOB_CHARACTERS & set(pattern):
        candidates = [Path(match) for match in glob.glob(os.path.expanduser(pattern), recursive=True)]
        what = "glob"
    else:
        raise DataError(f"{pattern}: no such file or folder. Check the path (relative paths start at {os.getcwd()}).")
    files = [file.absolute() for file in candidates if file.is_file()]
    supported = [file for file in files if _is_supported(file)]
    skipped = sorted(set(files) - set(supported))
    if skipped and supported:  # with nothing supported, the error below names them instead
        _warn_skipped(pattern, skipped, root=path.absolute() if what == "folder" else None)
    if not supported:
        found = f"only unsupported files such as {files[0].name}" if files else "no files"
        raise DataError(
            f"{pattern}: the {what} matches {found}; thuglm reads {', '.join(SUPPORTED_EXTENSIONS)} files."
        )
    return supported


SPREADSHEET_EXTENSIONS = (".xlsx", ".xlsm", ".xls", ".ods")


def _warn_skipped(pattern: str, skipped: list[Path], root: Path | None, shown: int = 10) -> None:
    """Name the files of a folder or glob that are left out: a spreadsheet among the data would otherwise be
    missing from training without a word."""
    names = [str(file.relative_to(root)) if root else str(file) for file in skipped]
    listed = ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")
    spreadsheet = any(file.suffix.lower() in SPREADSHEET_EXTENSIONS for file in skipped)
    logger.warning(
        "%s: skipping %d file(s) of a type thuglm does not read: %s (it reads %s)%s", pattern, len(skipped), listed,
        ", ".join(SUPPORTED_EXTENSIONS), "; save a spreadsheet as CSV (UTF-8) to use its rows" if spreadsheet else "",
    )


def _is_supported(path: Path) -> bool:
    return data_suffix(path) in FORMATS


def data_suffix(path: Path) -> str:
    """The format's extension of a data file, behind a compression's (`a.jsonl.gz`: `.jsonl`), lower case."""
    suffixes = [suffix.lower() for suffix in path.suffixes]
    if len(suffixes) >= 2 and suffixes[-1] in COMPRESSIONS:
        return suffixes[-2]
    return path.suffix.lower()


def _open_bytes(path: Path):
    """The file's bytes, decompressed when its name says it is compressed."""
    compression = COMPRESSIONS.get(path.suffix.lower())
    if compression is None:
        return open(path, "rb")
    return __import__(compression).open(path, "rb")


def _is_hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def detect_encoding(path: Path, sample_bytes: int = 1 << 20) -> str:
    """The text encoding of a data file: UTF-8 (with or without BOM), else GB18030.

    Chinese CSVs saved by Excel are GBK, of which GB18030 is a superset. The first `sample_bytes` decide; a file
    that fits neither is refused with a message rather than read as garbage.
    """
    with _open_bytes(path) as handle:
        sample = handle.read(sample_bytes)
    if sample.startswith(codecs.BOM_UTF8):
        return "utf-8-sig"
    for encoding in ("utf-8", "gb18030"):
        try:
            codecs.getincrementaldecoder(encoding)().decode(sample, final=False)  # a cut last character is fine
            return encoding
        except UnicodeDecodeError:
            continue
    names = _setting_names.get()
    fixes = ["convert it to UTF-8"]
    if names.encoding:
        fixes.insert(0, f"name its encoding with `{names.encoding}` (e.g. big5, utf-16)")
    if names.files:
        fixes.insert(0, f"remove it from {names.files}")
    advice = ", or ".join(fixes)
    raise DataError(
        f"{path}: this is neither UTF-8 nor GBK/GB18030 text (a binary file, or another encoding). "
        f"{advice[0].upper()}{advice[1:]}."
    )


def load_raw_dataset(
    patterns: str | Sequence[str],
    *,
    streaming: bool = False,
    cache_dir: str | None = None,
    columns: Sequence[str] | None = None,
    encoding: str | None = None,
    bad_rows: str = "skip",
    field: str | None = None,
    txt_unit: str = "line",
) -> datasets.Dataset | datasets.IterableDataset:
    """All rows of the files that `patterns` name, as one `datasets.Dataset` (or `IterableDataset` when streaming).

    Files of one format are loaded together by that format's builder; the formats are then concatenated. With
    `columns`, each part keeps only those columns first, so files whose other columns differ still combine, and a
    file lacking one of them is an error. `.txt` files give one row per line in a column "text".
    CSV / TSV / TXT files are read in `encoding`, or in the one `detect_encoding` finds for each (UTF-8 or
    GBK/GB18030); JSON must be UTF-8, as its standard says. `field`: the list of records inside each JSON file
    (`{"data": [...]}`); `txt_unit`: a sample of a `.txt` file is a line, a paragraph or the whole document.
    Compressed files (`.gz`, `.bz2`, `.xz` after the format's extension) are read decompressed.
    A CSV row with more cells than the header is skipped with a warning naming its line (`bad_rows="skip"`) or
    stops the load (`bad_rows="error"`); an empty or header-only file always stops it.
    """
    if bad_rows not in BAD_ROW_POLICIES:
        raise ValueError(f"bad_rows must be one of {', '.join(BAD_ROW_POLICIES)}, not {bad_rows!r}")
    files = resolve_data_files(patterns)
    groups: dict[tuple[str, tuple], list[Path]] = {}
    for file in files:
        builder, kwargs = FORMATS[data_suffix(file)]
        if builder == "json" and field:
            kwargs = {**kwargs, "field": field}
        if builder == "text" and txt_unit != "line":
            kwargs = {**kwargs, "sample_by": txt_unit}
        if builder in ("csv", "text"):
            kwargs = {**kwargs, "encoding": encoding or _detected(file)}
        elif builder == "json":
            _require_utf8_json(file)
        if builder == "csv":
            kwargs["on_bad_lines"] = "warn" if bad_rows == "skip" else "error"
        _require_rows(file, builder, kwargs.get("encoding", "utf-8"))
        groups.setdefault((builder, tuple(sorted(kwargs.items()))), []).append(file)
    parts = []
    for (builder, kwargs), group in groups.items():
        parts += _load_group(builder, dict(kwargs), group, streaming=streaming, cache_dir=cache_dir, columns=columns)
    if len(parts) == 1:
        return parts[0]
    try:
        return datasets.concatenate_datasets([_plain_strings(part) for part in parts])
    except ValueError as error:
        raise DataError(
            f"{_describe(files)}: the files cannot be combined ({error}). Give files whose common columns hold the "
            "same kind of values."
        ) from error


def _require_utf8_json(file: Path) -> None:
    """JSON is UTF-8 by its standard (RFC 8259), and `datasets` parses JSON arrays as UTF-8 whatever it is told."""
    if detect_encoding(file) == "gb18030":
        raise DataError(
            f"{file}: JSON must be UTF-8 (RFC 8259) and this file is GBK. Convert it, e.g. "
            f"`iconv -f gbk -t utf-8 {file.name} > utf8-{file.name}`, or save it as CSV."
        )


def _require_rows(file: Path, builder: str, encoding: str, sample_bytes: int = 1 << 16) -> None:
    """An empty or header-only file is a mistake (an export that failed, the wrong file): stop and name it.

    Only the first `sample_bytes` are read: a file with at least one row beyond the header passes at once.
    """
    if file.stat().st_size == 0:
        raise DataError(f"{file}: the file is empty (0 bytes). {_remove_or_export_again()}")
    if builder == "parquet":
        return
    with _open_bytes(file) as handle:
        sample = handle.read(sample_bytes).decode(encoding, errors="replace")
    lines = [line for line in sample.splitlines() if line.strip()]
    if not lines:
        raise DataError(f"{file}: the file holds only blank lines. {_remove_or_export_again()}")
    if builder == "csv" and len(lines) == 1:
        raise DataError(
            f"{file}: the file has a header ({lines[0].strip()[:80]}) but no rows. {_remove_or_export_again()}"
        )
    if builder == "json" and sample.strip() == "[]":
        raise DataError(f"{file}: the JSON array is empty (no records). {_remove_or_export_again()}")


def _detected(file: Path) -> str:
    encoding = detect_encoding(file)
    if encoding == "gb18030":
        logger.info("%s: not UTF-8; reading it as GBK/GB18030", file)
    return encoding


def _plain_strings(dataset):
    """The dataset with `large_string` columns cast to `string`.

    pandas 3 gives `large_string` (CSV, parquet written by pandas) where the JSON builder gives `string`, and
    `concatenate_datasets` refuses to align the two.
    """
    features = dataset.features
    plain = _visit(features, lambda f: Value("string") if isinstance(f, Value) and f.dtype == "large_string" else f)
    return dataset if plain == features else dataset.cast(plain)


def _load_group(builder, kwargs, files, *, streaming, cache_dir, columns) -> list:
    """Files of one format in one load; if that fails, one load per file.

    A builder casts every file to the first file's columns, so files with different columns fail together but load
    one by one; a broken file then fails alone, and the error can name it.
    """
    try:
        loaded = [(files, _load(builder, kwargs, files, streaming=streaming, cache_dir=cache_dir))]
    except DatasetGenerationError as error:
        if len(files) == 1:
            raise _generation_error(files, error) from error
        logger.debug("reading the %s files one at a time after: %s", builder, error.__cause__ or error)
        loaded = [([file], _load_file(builder, kwargs, file, streaming, cache_dir)) for file in files]
    return [_select(part, names, columns) for names, part in loaded]


def _load_file(builder, kwargs, file, streaming, cache_dir):
    try:
        return _load(builder, kwargs, [file], streaming=streaming, cache_dir=cache_dir)
    except DatasetGenerationError as error:
        raise _generation_error([file], error) from error


def _load(builder, kwargs, files, *, streaming, cache_dir):
    if streaming and builder == "csv":
        kwargs = {**kwargs, "features": _csv_features(files[0], kwargs)}
    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # a failing file is reported once, by DataError
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            dataset = datasets.load_dataset(
                builder, data_files=[str(file) for file in files], split="train", streaming=streaming,
                cache_dir=cache_dir, **kwargs,
            )
    finally:
        datasets.logging.set_verbosity(verbosity)
    _report_skipped_lines(files, caught)
    if streaming and dataset.features is None:
        # Builders such as csv know their columns only once they read a row. Resolve them now, so that
        # `column_names` works (for choosing columns and the text column) as it does without streaming.
        dataset = dataset._resolve_features()
    return dataset


def _csv_features(file: Path, kwargs: dict, head_rows: int = 100) -> datasets.Features | None:
    """The columns and types of a CSV file from its first rows, read by pandas as the csv builder reads them.

    Streamed without features, the csv builder learns its columns only by reading a row, and a stream dropped after
    its first rows leaves its file open until garbage collection: datasets' streaming `read_csv` opens the file
    itself and closes it only at the end (a ResourceWarning, and one open file per load). pandas opens and closes
    this read. None where the head does not parse: the builder then reads the file and reports what is wrong.
    """
    import pandas as pd
    import pyarrow as pa

    options = {**kwargs, "on_bad_lines": "skip"}  # skipped rows are reported once, by the builder's own read
    try:
        head = pd.read_csv(file, nrows=head_rows, **options)
    except (ValueError, UnicodeDecodeError):  # pandas' ParserError is a ValueError
        return None
    return datasets.Features.from_arrow_schema(pa.Schema.from_pandas(head, preserve_index=False))


_SKIPPED_LINE = re.compile(r"Skipping line (\d+): (.*)")
_BAD_FIELDS = re.compile(r"Expected (\d+) fields in line (\d+), saw (\d+)")
_OPEN_QUOTE = re.compile(r"EOF inside string starting at row (\d+)")


def _report_skipped_lines(files: Sequence[Path], caught) -> None:
    """pandas reports each CSV row it skipped (`on_bad_lines="warn"`) as a warning: name them in the log.

    A load from the datasets cache reads no CSV, so only the first load of a file reports its skipped rows.
    """
    skipped = [match for warning in caught for line in str(warning.message).splitlines()
               if (match := _SKIPPED_LINE.search(line))]
    for match in skipped[:20]:
        logger.warning("%s: skipped line %s (%s): quote cells that contain the separator", _describe(files),
                       match.group(1), match.group(2).strip())
    if skipped:
        on_bad_row = _setting_names.get().on_bad_row
        instead = f"; set {on_bad_row.format(policy='error')} to stop at the first instead" if on_bad_row else ""
        logger.warning("%s: skipped %d malformed CSV row(s) in all%s", _describe(files), len(skipped), instead)
    for warning in caught:  # anything else keeps its usual route
        if not _SKIPPED_LINE.search(str(warning.message)):
            warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)


def _generation_error(files: Sequence[Path], error: Exception) -> DataError:
    cause = error.__cause__ or error
    where = _describe(files)
    names = _setting_names.get()
    if (fields := _BAD_FIELDS.search(str(cause))) is not None:
        expected, line, saw = fields.groups()
        skip = (f", or set {names.on_bad_row.format(policy='skip')} to skip such rows (they are counted in the log)"
                if names.on_bad_row else "")
        return DataError(
            f"{where}: line {line} has {saw} cells where the header has {expected}. Quote cells that contain the "
            f"separator (\"a, b\"){skip}."
        )
    if (quote := _OPEN_QUOTE.search(str(cause))) is not None:
        return DataError(
            f"{where}: the quoted cell that starts in row {quote.group(1)} is never closed, so the rest of the file "
            "would be one cell. Close the quote (a quote inside a quoted cell is written twice: \"\")."
        )
    if len(files) == 1 and files[0].suffix.lower() in (".json", ".jsonl"):
        location = _json_syntax_error(files[0])
        if location is not None:
            return DataError(f"{where}: invalid JSON at {location}. Fix that line (a validator such as "
                             "`python -m json.tool FILE` shows the context).")
    other_encoding = f" (else set `{names.encoding}`)" if names.encoding else ""
    return DataError(
        f"{where}: could not be read ({type(cause).__name__}: {cause}). Check that the file is valid, "
        f"in UTF-8 or GBK{other_encoding}, and that its extension matches its format."
    )


def _json_syntax_error(file: Path) -> str | None:
    """`line L, column C: what` for the first syntax error in a JSON or JSON-lines file, or None if it parses."""
    text = file.read_text(encoding="utf-8-sig", errors="replace")
    if file.suffix.lower() == ".jsonl" or not text.lstrip().startswith("["):
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                json.loads(line)
            except json.JSONDecodeError as error:
                return _json_error_location(line, error, first_line=number)
        return None
    try:
        json.loads(text)
    except json.JSONDecodeError as error:
        return _json_error_location(text, error)
    return None


def _json_error_location(document: str, error: json.JSONDecodeError, first_line: int = 1) -> str:
    """`line L, column C: what` of a JSON syntax error, where a trailing comma is called what it is.

    Python's parser reports `[{...},]` or `{"a": 1,}` as "Expecting value" (or "Expecting property name") at the
    closing bracket, often on the line after the comma that is the mistake; the comma's own place is given instead.
    """
    before = document[: error.pos].rstrip()
    closing = document[error.pos : error.pos + 1]
    if before.endswith(",") and closing in ("]", "}"):
        comma = len(before) - 1
        line = document.count("\n", 0, comma) + first_line
        column = comma - document.rfind("\n", 0, comma)
        return (f"line {line}, column {column}: a trailing comma before '{closing}' (JSON allows no comma after the "
                "last item): remove it")
    return f"line {error.lineno + first_line - 1}, column {error.colno}: {error.msg}"


def _select(dataset, files: Sequence[Path], columns: Sequence[str] | None):
    if columns is None:
        return dataset
    found = list(dataset.column_names or [])
    missing = [column for column in columns if column not in found]
    if missing:
        raise DataError(
            f"{_describe(files)}: no column {missing[0]!r} (columns found: {', '.join(found) or 'none'}). "
            f"Every data file needs the columns {', '.join(columns)}."
        )
    return dataset.select_columns(list(columns))


def _describe(files: Sequence[Path]) -> str:
    names = ", ".join(str(file) for file in files[:3])
    return names + (f" and {len(files) - 3} more" if len(files) > 3 else "")


def guess_text_column(column_names: Sequence[str], requested: str | None, source: str) -> str:
    """The column that holds the training text.

    `requested` (the user's `data.text_column`, or a command's `--text-column`) must exist. Without it the column
    is the first of "content", "text", "sentence" that exists, or the only column; anything else is ambiguous, and
    guessing wrong would train on ids or titles without a word of warning.
    """
    names = list(column_names)
    listed = ", ".join(names) or "none"
    if requested is not None:
        if requested in names:
            return requested
        close = difflib.get_close_matches(requested, names, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise DataError(f"{source}: no column {requested!r} (columns: {listed}).{hint}")
    for candidate in ("content", "text", "sentence"):
        if candidate in names:
            return candidate
    if len(names) == 1:
        return names[0]
    setting = _setting_names.get().text_column
    choose = f"Name one of them with `{setting}`." if setting else "Rename the text column to `text`."
    raise DataError(f"{source}: cannot tell which column holds the text (columns: {listed}). {choose}")
