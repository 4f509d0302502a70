"""`data.format: alpaca`: instruction (prompt), input (query), output (response), history, system columns.

The question is `instruction`, then `input` on a new line when there is one (the alpaca convention); `history` is a
list of [query, response] pairs before it. The canonical dialogue is history's turns, then question and answer.

A ranking file (`task: dpo`, LLaMA-Factory's `ranking: true`) has `chosen` and `rejected` answers instead of `output`:
its canonical row is the dialogue up to the question, and the two answers.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..loading import DataError
from .base import BadRow, DataFormat, FormatBinding, SourceSpec, cell_text, find_column, ranking_answers

DEFAULT_COLUMNS = {"prompt": "instruction", "query": "input", "response": "output", "history": "history",
                   "system": "system"}
RANKING_COLUMNS = {"chosen": "chosen", "rejected": "rejected"}


class AlpacaFormat(DataFormat):
    name = "alpaca"
    kind = "dialogue"
    column_keys = (*DEFAULT_COLUMNS, *RANKING_COLUMNS)

    def bind(self, spec: SourceSpec, column_names: Sequence[str], source: str, *, training: bool = True) -> FormatBinding:
        if spec.ranking:
            return self._bind_ranking(spec, column_names, source, training)
        required = ["prompt", "response"] if training else ["prompt"]
        missing = [role for role in required if spec.columns.get(role) is None and DEFAULT_COLUMNS[role] not in column_names]
        if len(missing) > 1:  # all at once: AdvertiseGen's content / summary need both keys
            needs = " and ".join(f"`{role}` ({DEFAULT_COLUMNS[role]} by default)" for role in missing)
            keys = " ".join(f"data.columns.{role}=NAME" for role in missing)
            raise DataError(f"{source}: alpaca data needs columns for {needs}, and the file's columns are "
                            f"{', '.join(column_names) or 'none'}. Name them with {keys}.")
        columns = {
            role: find_column(column_names, role, spec.columns.get(role), [default], fmt="alpaca", source=source,
                              required=role == "prompt" or (role == "response" and training))
            for role, default in DEFAULT_COLUMNS.items()
        }
        return FormatBinding(self.name, columns, {}, training)

    def _bind_ranking(self, spec: SourceSpec, column_names: Sequence[str], source: str, training: bool) -> FormatBinding:
        defaults = {**{role: DEFAULT_COLUMNS[role] for role in ("prompt", "query", "history", "system")},
                    **RANKING_COLUMNS}
        columns = {
            role: find_column(column_names, role, spec.columns.get(role), [default], fmt="alpaca ranking",
                              source=source, required=role in ("prompt", "chosen", "rejected"))
            for role, default in defaults.items()
        }
        return FormatBinding(self.name, columns, {}, training)

    def convert(self, row: dict, binding: FormatBinding) -> dict:
        columns = binding.columns
        if binding.ranking:
            chosen, rejected = (cell_text(row.get(columns[role]), f"`{columns[role]}`") for role in RANKING_COLUMNS)
            question = {role: column for role, column in columns.items() if role not in RANKING_COLUMNS}
            dialogue = self.convert(row, FormatBinding(self.name, {**question, "response": None}, {}, training=False))
            return {**dialogue, **dict(zip(RANKING_COLUMNS, ranking_answers(chosen, rejected, columns)))}
        instruction = cell_text(row.get(columns["prompt"]), f"`{columns['prompt']}`").strip()
        extra = cell_text(row.get(columns["query"]), f"`{columns['query']}`").strip() if columns["query"] else ""
        query = f"{instruction}\n{extra}" if instruction and extra else instruction or extra
        system = cell_text(row.get(columns["system"]), f"`{columns['system']}`") if columns["system"] else ""
        turns = []
        if columns["history"] is not None:
            for pair in history_pairs(row.get(columns["history"]), columns["history"]):
                turns.extend(pair)
        turns.append(query)
        if columns["response"] is not None:
            response = cell_text(row.get(columns["response"]), f"`{columns['response']}`")
            if response.strip():
                turns.append(response)
            elif binding.training:
                raise BadRow(f"`{columns['response']}` is empty (no answer to learn)")
        for index in range(1, len(turns) - 1, 2):
            if not turns[index].strip():
                raise BadRow(f"`{columns['history']}` has an empty answer", f"`{columns['history']}` round {index // 2} "
                             "has an empty answer")
        return {"system": system, "turns": turns}

    def unused_hint(self, binding: FormatBinding, unused: Sequence[str]) -> str:
        import difflib

        missing = [role for role, column in binding.columns.items() if column is None]
        for column in unused:
            close = difflib.get_close_matches(column, [DEFAULT_COLUMNS[role] for role in missing], n=1, cutoff=0.6)
            if close:
                role = next(role for role in missing if DEFAULT_COLUMNS[role] == close[0])
                return f"Did you mean `{column}` as `{close[0]}`? Then set data.columns.{role}={column}."
        return ""


def history_pairs(value, column: str) -> list[tuple[str, str]]:
    """`history` as (query, response) pairs; anything else is a bad row."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)) and all(isinstance(turn, (list, tuple)) and len(turn) == 2 for turn in value):
        return [(cell_text(query, f"`{column}`"), cell_text(response, f"`{column}`")) for query, response in value]
    raise BadRow(f"`{column}` is not a list of [query, response] pairs",
                 f"`{column}` must be a list of [query, response] pairs, got {str(value)[:60]!r} (write such rows as "
                 "JSON or JSONL: a CSV cell cannot hold a list)")
