"""Drop-ins: `NAME.toml.d/*.toml` merged over `NAME.toml`, as systemd and mkosi do.

Files are merged in lexical order of their names, before the config is validated, so a
merged config meets the same checks and messages as a single file. A scalar or a plain
array overrides; a table merges key by key; an entry of an array of tables ([[vfio]],
[[disk]], ...) whose `id` an earlier entry has changes that entry's keys, any other entry
is appended. Every key path remembers the file that wrote it, for errors and `vmrun show`.
"""

from __future__ import annotations

import pathlib
from typing import Any, TypeGuard

from vmrun.base.errors import ConfigError
from vmrun.base.problems import Problem, Sources
from vmrun.config import files
from vmrun.config.document import read_toml
from vmrun.config.quoting import key_part

SUFFIX = files.SUFFIX


def directory(config: pathlib.Path) -> pathlib.Path:
    """Where the drop-ins of `config` live: `NAME.toml.d` beside it."""
    return pathlib.Path(files.directory(str(config)))


def merged(config: pathlib.Path, base: dict[str, Any], main: files.File) -> tuple[dict[str, Any], Sources]:
    """`base` (the document of `config`, read as `main`) with its drop-ins merged in, and who
    wrote what. Each drop-in is read under the trust rule, with the config's owner."""
    written: dict[str, str] = {}
    for name, value in base.items():
        record(join("", name), value, str(config), written)
    try:
        dropin_files, unreadable = files.dropins(main)
    except files.Unreadable as e:
        raise ConfigError(str(config), [Problem("", e.message, e.hint, e.path)]) from None
    problems = [Problem("", e.message, e.hint, e.path) for e in unreadable]
    for file in dropin_files:
        try:
            over = read_toml(file.text, pathlib.Path(file.path))
        except ConfigError as e:
            problems += [Problem(p.path, p.message, p.hint, p.file or e.file) for p in e.problems]
            continue
        merge(base, over, "", file.path, written)
    if problems:
        raise ConfigError(str(config), problems)
    return base, Sources(str(config), tuple(written.items()))


def merge(table: dict[str, Any], new: dict[str, Any], path: str, file: str, written: dict[str, str]) -> None:
    """Writes the table `new` of `file` over `table`, at key path `path`."""
    for name, value in new.items():
        here = join(path, name)
        before = table.get(name)
        if isinstance(before, dict) and isinstance(value, dict):
            merge(before, value, here, file, written)
        elif table_array(before) and table_array(value):
            for item in value:
                at = same_id(before, item)
                if at is None:
                    before.append(item)
                    record(f"{here}[{len(before) - 1}]", item, file, written)
                else:
                    merge(before[at], item, f"{here}[{at}]", file, written)
        else:
            forget(here, written)
            table[name] = value
            record(here, value, file, written)


def record(path: str, value: object, file: str, written: dict[str, str]) -> None:
    """`file` wrote `value` at `path`: the value and each key in it, as deep as it goes."""
    if isinstance(value, dict):
        for name, item in value.items():
            record(join(path, name), item, file, written)
    elif table_array(value):
        for i, item in enumerate(value):
            record(f"{path}[{i}]", item, file, written)
    written[path] = file


def forget(path: str, written: dict[str, str]) -> None:
    """A value replaced whole: what was written inside it is gone with it."""
    for key in [k for k in written if k == path or k.startswith((f"{path}.", f"{path}["))]:
        del written[key]


def join(path: str, name: str) -> str:
    part = key_part(name)
    return part[1:] if not path else path + part


def table_array(value: object) -> TypeGuard[list[dict[str, Any]]]:
    return isinstance(value, list) and bool(value) and all(isinstance(i, dict) for i in value)


def same_id(entries: list[dict[str, Any]], item: dict[str, Any]) -> int | None:
    ident = item.get("id")
    if not isinstance(ident, str):
        return None
    return next((i for i, entry in enumerate(entries) if entry.get("id") == ident), None)
