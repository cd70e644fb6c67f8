"""A config's values as TOML writes them, for messages: escaped, so nothing a config
holds can act on a terminal, and cut short when long.
"""

from __future__ import annotations

import datetime
import json
import re
from collections.abc import Iterator, Mapping


def toml_type(value: object) -> str:
    names = {bool: "boolean", int: "integer", float: "float", str: "string", list: "array"}
    if isinstance(value, dict):
        return "table"
    return names.get(type(value), "date-time")


SHOWN_MAX = 60
# TOML's bare keys: any other key is shown quoted in a key path.
BARE_KEY_RE = re.compile(r"[A-Za-z0-9_-]+")


def quoted(text: str) -> str:
    """`text` as a TOML string in printable ASCII: no character of it can act on a terminal
    (a control, an escape sequence, a bidi override), and a lookalike (the Kelvin sign for
    K, another script's digits) shows as what it is, the likely reason it was refused."""
    return (
        '"'
        + "".join(c if " " <= c <= "~" else escaped_char(c) for c in json.dumps(text, ensure_ascii=False)[1:-1])
        + '"'
    )


def escaped_char(c: str) -> str:
    return f"\\u{ord(c):04x}" if ord(c) <= 0xFFFF else f"\\U{ord(c):08x}"


def key_part(name: str) -> str:
    """A table key as it joins a key path: `.memory`, or `."bad key"` when not bare."""
    return f".{name}" if BARE_KEY_RE.fullmatch(name) else f".{quoted(name)}"


def shown(value: object) -> str:
    """A value as TOML writes it, escaped (a newline shows as \\n), long ones cut short."""
    text = render(value, SHOWN_MAX)
    if len(text) <= SHOWN_MAX:
        return text
    cut = text[: SHOWN_MAX - 6]
    return cut + '[...]"' if isinstance(value, str) else cut + "[...]"


def render(value: object, budget: int) -> str:
    """TOML text of `value`, stopping once it is longer than `budget`: a config's value may be
    nested hundreds deep or be an integer of thousands of digits, which repr() cannot show."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return quoted(value[: budget + 1])
    if isinstance(value, int):
        try:
            return str(value)[: budget + 1]
        except ValueError:  # more decimal digits than Python prints; hex has no limit
            return hex(value)[: budget + 1]
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, list | dict) and budget <= 0:
        return "..."
    # Each level down has less room, so the recursion stops within SHOWN_MAX levels.
    if isinstance(value, list):
        return "[" + items((render(item, budget - 2) for item in value), budget) + "]"
    if isinstance(value, dict):
        pairs = (f"{key_part(key[:budget])[1:]} = {render(item, budget - 2)}" for key, item in value.items())
        return "{ " + items(pairs, budget) + " }" if value else "{}"
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()
    return repr(value)


def items(texts: Iterator[str], budget: int) -> str:
    """Comma-separated, taking no more once `budget` characters are reached."""
    out: list[str] = []
    length = 0
    for text in texts:
        out.append(text)
        length += len(text) + 2
        if length > budget:
            break
    return ", ".join(out)


def did_you_mean(word: str, options: tuple[str, ...] | list[str] | Mapping[str, object]) -> str | None:
    import difflib  # only for a config with a typo

    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}?" if close else None
