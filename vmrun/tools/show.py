"""`vmrun show`: the config as `run` uses it, drop-ins merged and every default filled in.

Written back from the validated model through the key tables (each parser's Traits say how
its value reads as TOML), so what is shown is what was parsed, and the TOML form is itself
a config that loads to the same VM. The text form says which file set each value.
"""

from __future__ import annotations

import json
from typing import Any

import attrs
import tomli_w

from vmrun.base import tables
from vmrun.config import keytable, quoting
from vmrun.config.model import Config

DEFAULT = "(default)"


def section(keys: tuple[keytable.Key, ...], model: object) -> dict[str, object]:
    values = attrs.asdict(model, recurse=False)  # type: ignore[arg-type]
    return {k.name: k.dump(values[k.name]) for k in keys}


def document(cfg: Config) -> dict[str, Any]:
    """Every key of every section, None where unset (no default, and none given)."""
    doc: dict[str, Any] = {}
    for name, kind in keytable.SECTIONS.items():
        keys = keytable.SECTION_KEYS[name]
        if kind == "table":
            doc[name] = section(keys, getattr(cfg, name))
        else:
            doc[name] = [section(keys, entry) for entry in getattr(cfg, name)]
    return doc


def json_text(cfg: Config) -> str:
    return json.dumps({"config": str(cfg.file), **document(cfg)}, indent=2) + "\n"


def toml_text(cfg: Config) -> str:
    """A config file: [vm] then each [[entry]], one `key = value` a line. Unset keys and empty
    arrays and tables are left out: they say nothing, and some (forwards of a tap) are
    refused where they do not apply."""
    dropins = cfg.sources.dropins()
    head = f"# {cfg.file}" + (f" with {', '.join(dropins)}" if dropins else "") + ", defaults filled in\n\n"
    return head + config_text(document(cfg))


def config_text(doc: dict[str, Any], comments: dict[str, str] | None = None) -> str:
    """A config document as TOML, the way people write one: [vm], then each [[entry]], one
    `key = value` a line; a key of `comments` ("vm.args") gets its text as comment lines above it."""
    comments = comments or {}
    out: list[str] = []
    for name, value in doc.items():
        for i, table in enumerate([value] if isinstance(value, dict) else value):
            out += ["", f"[{name}]" if isinstance(value, dict) else f"[[{name}]]"]
            for key, item in table.items():
                if item in (None, [], {}):
                    continue
                where = (
                    f"{name}{quoting.key_part(key)}"
                    if isinstance(value, dict)
                    else f"{name}[{i}]{quoting.key_part(key)}"
                )
                out += [f"# {line}" for line in comments.get(where, "").splitlines()]
                out.append(f"{quoting.key_part(key)[1:]} = {value_text(item)}")
    return "\n".join(out).lstrip("\n") + "\n"


def value_text(value: object) -> str:
    """One value as TOML writes it, on one line (a table inline)."""
    if isinstance(value, dict):
        if not value:
            return "{}"
        return "{ " + ", ".join(f"{quoting.key_part(k)[1:]} = {value_text(v)}" for k, v in value.items()) + " }"
    text = tomli_w.dumps({"v": value})[len("v = ") :]
    return " ".join(line.strip() for line in text.splitlines()).replace("[ ", "[").replace(", ]", "]")


def text(cfg: Config) -> str:
    """`key.path = value   file` for each value, unset keys left out."""
    rows = [("KEY", "VALUE", "SET BY")]
    for name, value in document(cfg).items():
        entries = [(name, value)] if isinstance(value, dict) else [(f"{name}[{i}]", v) for i, v in enumerate(value)]
        for prefix, table in entries:
            for key, item in table.items():
                if item is None:
                    continue
                path = prefix + quoting.key_part(key)
                rows.append((path, value_text(item), ", ".join(cfg.sources.set_by(path)) or DEFAULT))
    return tables.table(rows)
