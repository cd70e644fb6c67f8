"""Drop-ins: `NAME.toml.d/*.toml` merged over `NAME.toml`, as systemd and mkosi do.

Files are merged in lexical order of their names, before the config is validated, so a
merged config meets the same checks and messages as a single file. A scalar or a plain
array overrides; a table merges key by key; an entry of an array of tables ([[vfio]],
[[disk]], ...) whose `id` an earlier entry has changes that entry's keys, any other entry
is appended. Every key path remembers the file that wrote it, for errors and `vmrun show`.
"""

from __future__ import annotations

import os
import pathlib
import stat
from typing import Any, TypeGuard

from vmrun.errors import ConfigError
from vmrun.problems import Problem, Sources

SUFFIX = ".toml"


def directory(config: pathlib.Path) -> pathlib.Path:
    """Where the drop-ins of `config` live: `NAME.toml.d` beside it."""
    return config.with_name(config.name + ".d")


def dropin_files(config: pathlib.Path) -> list[pathlib.Path]:
    """The drop-ins of `config` in the order they apply; none when there is no directory."""
    d = directory(config)
    try:
        mode = os.stat(d).st_mode
    except FileNotFoundError:
        return []
    except OSError as e:
        raise ConfigError(str(d), [Problem("", f"cannot read: {e.strerror}", "check its permissions")]) from None
    if not stat.S_ISDIR(mode):
        raise ConfigError(str(d), [Problem("", "is not a directory", f"drop-ins of {config.name} go in a directory")])
    try:
        names = os.listdir(d)
    except OSError as e:
        raise ConfigError(str(d), [Problem("", f"cannot read: {e.strerror}", "check its permissions")]) from None
    # Editors leave hidden files (.#x.toml) behind; anything not *.toml is not a drop-in.
    files = [d / n for n in sorted(names) if n.endswith(SUFFIX) and not n.startswith(".")]
    owner = os.stat(config).st_uid
    problems = [p for p in (unsafe(path, owner) for path in (d, *files)) if p is not None]
    if problems:
        raise ConfigError(str(config), problems)
    return files


def unsafe(path: pathlib.Path, owner: int) -> Problem | None:
    """Why `path` may not add to a config: vmrun runs as root, so a drop-in someone else
    can write would let them change what it does (trusted disks, users, devices)."""
    try:
        st = os.stat(path)
    except OSError as e:
        return Problem("", f"cannot read: {e.strerror}", "check its permissions", str(path))
    if st.st_uid not in (0, owner):
        return Problem(
            "",
            f"is owned by uid {st.st_uid}, not by the config's owner (uid {owner}) or root",
            "a drop-in changes what vmrun does: chown it to the config's owner",
            str(path),
        )
    if st.st_mode & stat.S_IWOTH:
        return Problem("", "is writable by every user", "a drop-in changes what vmrun does: chmod o-w", str(path))
    return None


def merged(config: pathlib.Path, base: dict[str, Any]) -> tuple[dict[str, Any], Sources]:
    """`base` (the document of `config`) with its drop-ins merged in, and who wrote what."""
    from vmrun.config import read_text, read_toml

    written: dict[str, str] = {}
    for name, value in base.items():
        record(join("", name), value, str(config), written)
    problems: list[Problem] = []
    for file in dropin_files(config):
        try:
            over = read_toml(read_text(file), file)
        except ConfigError as e:
            problems += [Problem(p.path, p.message, p.hint, p.file or e.file) for p in e.problems]
            continue
        merge(base, over, "", str(file), written)
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
    from vmrun.config import key_part

    part = key_part(name)
    return part[1:] if not path else path + part


def table_array(value: object) -> TypeGuard[list[dict[str, Any]]]:
    return isinstance(value, list) and bool(value) and all(isinstance(i, dict) for i in value)


def same_id(entries: list[dict[str, Any]], item: dict[str, Any]) -> int | None:
    ident = item.get("id")
    if not isinstance(ident, str):
        return None
    return next((i for i, entry in enumerate(entries) if entry.get("id") == ident), None)
