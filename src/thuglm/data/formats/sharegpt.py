"""`data.format: sharegpt`: a list of messages a row, as sharegpt, OpenAI and Firefly write dialogues.

    sharegpt:  {"conversations": [{"from": "human", "value": "..."}, {"from": "gpt", "value": "..."}], "system": "..."}
    OpenAI:    {"messages": [{"role": "system", ...}, {"role": "user", "content": "..."}, {"role": "assistant", ...}]}
    Firefly:   {"conversation": [{"human": "...", "assistant": "..."}, ...]}

The messages column is `columns.messages` (default `conversations`; `messages` and `conversation` are found by
themselves). `tags` name the keys and roles (defaults from / value / human / gpt / system). Messages written with
OpenAI's role / content / user / assistant / system and Firefly's {human, assistant} rounds are recognised in each
row without any key, unless `tags` names other keys.

A system message may come first (or a `system` column holds it); then user and assistant alternate, starting with
the user. A dialogue out of that order, with an empty answer or with another role (function calls, observations) is
a bad row. For training the dialogue must end with an answer.

A ranking file (`task: dpo`, LLaMA-Factory's `ranking: true`) ends its messages with the user's question and holds
the two answers in `chosen` and `rejected` columns, each one assistant message (or plain text).
"""

from __future__ import annotations

from collections.abc import Sequence

from .base import BadRow, DataFormat, FormatBinding, SourceSpec, cell_text, find_column, ranking_answers

DEFAULT_TAGS = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
                "system_tag": "system"}
OPENAI_TAGS = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
               "system_tag": "system"}
MESSAGE_COLUMNS = ("conversations", "messages", "conversation")
SYNONYMS = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "chatgpt": "assistant"}
"""Role names read without `tags` besides the defaults (sharegpt variants that write user / assistant)."""
TOOL_ROLES = ("observation", "function_call", "function", "tool")


class ShareGptFormat(DataFormat):
    name = "sharegpt"
    kind = "dialogue"
    column_keys = ("messages", "system", "chosen", "rejected")
    uses_tags = True

    def bind(self, spec: SourceSpec, column_names: Sequence[str], source: str, *, training: bool = True) -> FormatBinding:
        requested = spec.columns.get("messages")
        columns = {
            "messages": find_column(column_names, "messages", requested, MESSAGE_COLUMNS, fmt="sharegpt",
                                    source=source, required=True),
            "system": find_column(column_names, "system", spec.columns.get("system"), ["system"], fmt="sharegpt",
                                  source=source, required=False),
        }
        if spec.ranking:
            for role in ("chosen", "rejected"):
                columns[role] = find_column(column_names, role, spec.columns.get(role), [role], fmt="sharegpt ranking",
                                            source=source, required=True)
        return FormatBinding(self.name, columns, dict(spec.tags), training)

    def convert(self, row: dict, binding: FormatBinding) -> dict:
        if binding.ranking:
            question = {"messages": binding.columns["messages"], "system": binding.columns["system"]}
            dialogue = self.convert(row, FormatBinding(self.name, question, binding.tags, training=False))
            if len(dialogue["turns"]) % 2 == 0:
                raise BadRow(f"`{question['messages']}` ends with an answer, not the question `chosen` and "
                             "`rejected` answer")
            chosen, rejected = (_answer(row.get(binding.columns[role]), binding.tags, binding.columns[role])
                                for role in ("chosen", "rejected"))
            return {**dialogue, **dict(zip(("chosen", "rejected"), ranking_answers(chosen, rejected, binding.columns)))}
        column = binding.columns["messages"]
        messages = row.get(column)
        if not isinstance(messages, (list, tuple)) or not messages:
            raise BadRow(f"`{column}` is not a list of messages", f"`{column}` holds {str(messages)[:60]!r}, not a "
                         "list of messages")
        roles = [_role_and_content(message, binding.tags, column) for message in _rounds_to_messages(messages, column)]
        system = cell_text(row.get(binding.columns["system"]), "`system`") if binding.columns["system"] else ""
        if roles and roles[0][0] == "system":
            system = "\n".join(text for text in (system, roles.pop(0)[1]) if text.strip())
        turns = []
        for index, (role, content) in enumerate(roles):
            expected = "user" if index % 2 == 0 else "assistant"
            if role != expected:
                what = {"system": "a system message after the first", "user": "two user turns in a row",
                        "assistant": "an assistant turn first" if index == 0 else "two assistant turns in a row"}[role]
                raise BadRow(f"`{column}` has {what}", f"`{column}` has {what} (message {index + 1}; the dialogue "
                             "must alternate user, assistant, starting with the user)")
            if role == "assistant" and not content.strip():
                raise BadRow(f"`{column}` has an empty answer", f"`{column}` has an empty answer (message {index + 1})")
            turns.append(content)
        if not turns:
            raise BadRow(f"`{column}` has no user message")
        if binding.training and len(turns) % 2:
            raise BadRow(f"`{column}` ends with a user message that has no answer")
        return {"system": system, "turns": turns}


def _answer(value, tags: dict, column: str) -> str:
    """A ranking row's answer: one assistant message (alone or in a list of one), or plain text."""
    if isinstance(value, (list, tuple)) and len(value) == 1:
        value = value[0]
    if isinstance(value, dict):
        role, content = _role_and_content(value, tags, column)
        if role != "assistant":
            raise BadRow(f"`{column}` is not an assistant message", f"`{column}` is a {role} message, not the "
                         "assistant's answer")
        return content
    return cell_text(value, f"`{column}`")


def _rounds_to_messages(messages, column: str) -> list:
    """Firefly's {"human": q, "assistant": a} rounds as two messages each; other messages unchanged."""
    out = []
    for message in messages:
        if isinstance(message, dict) and message.get("human") is not None and "role" not in message \
                and message.get("from") is None:
            out.append({"role": "user", "content": message.get("human")})
            if message.get("assistant") is not None:
                out.append({"role": "assistant", "content": message.get("assistant")})
        else:
            out.append(message)
    return out


def _role_and_content(message, tags: dict, column: str) -> tuple[str, str]:
    """("user" | "assistant" | "system", text) of one message, with the row's tags or OpenAI's."""
    if not isinstance(message, dict):
        raise BadRow(f"`{column}` holds something that is not a message object",
                     f"`{column}` holds {str(message)[:60]!r}, not a message object")
    chosen = {**DEFAULT_TAGS, **tags}
    if message.get(chosen["role_tag"]) is None and message.get("role") is not None:
        chosen = OPENAI_TAGS
    role = message.get(chosen["role_tag"])
    names = {chosen["user_tag"]: "user", chosen["assistant_tag"]: "assistant", chosen["system_tag"]: "system"}
    if "user_tag" not in tags and "assistant_tag" not in tags:  # sharegpt files that write OpenAI's role names
        names = {**SYNONYMS, **names}
    if role is not None and role in (tags.get("observation_tag"), tags.get("function_tag"), *TOOL_ROLES):
        raise BadRow(f"`{column}` has a tool call or tool output (role {role!r})",
                     f"a message of `{column}` has the role {role!r}: tool calls and their outputs are not trained "
                     "(ChatGLM-6B has no slot for them); remove such rows or their tool messages")
    if role not in names:
        raise BadRow(f"`{column}` has a message of the role {role!r}",
                     f"a message of `{column}` has the role {role!r} under {chosen['role_tag']!r}; known roles: "
                     f"{', '.join(repr(name) for name in names)} (set data.tags to read other names)")
    return names[role], cell_text(message.get(chosen["content_tag"]), f"a message's `{chosen['content_tag']}`")
