"""The files a VM's config is made of, read as vmrun (root) may read them: the config, its
drop-in directory `NAME.toml.d` and the drop-ins in it, and `vmrun attach` fragments.

Each file is opened through the trust rule (trust.py) and read once, from the descriptor
that was judged: what was checked is what is parsed. The config loader and the plan
cache's key both read through here, so a kept plan is compared with exactly the bytes a
planning run would read.

On the kept-plan launch's path: no attrs, no typing, no pathlib.
"""

from __future__ import annotations

import os

from vmrun.base import trust

SUFFIX = ".toml"
MAX_BYTES = 1 << 20  # a VM config is a few KiB


class Unreadable(Exception):
    """A file that cannot be part of a config: where, what is wrong, and the fix."""

    def __init__(self, path: str, message: str, hint: str | None = None) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path
        self.message = message
        self.hint = hint


class File:
    """A config file as read: its path as named, its text, and the stat it was judged by."""

    __slots__ = ("path", "st", "text")

    def __init__(self, path: str, text: str, st: os.stat_result) -> None:
        self.path = path
        self.text = text
        self.st = st

    def ident(self) -> list[int]:
        st = self.st
        return [st.st_mode, st.st_uid, st.st_gid, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def directory(config: str) -> str:
    """Where the drop-ins of `config` live: `NAME.toml.d` beside it."""
    return config.rstrip("/") + ".d"


def is_dropin(name: str) -> bool:
    # Editors leave hidden files (.#x.toml) behind; anything not *.toml is not a drop-in.
    return name.endswith(SUFFIX) and not name.startswith(".")


def read(path: str, owner: int | None, kind: str = "config") -> File:
    """The file `path`, judged by the trust rule: `owner` is the config's owner (None when
    `path` is the config itself)."""
    try:
        fd, st = trust.open_file(path, owner)
    except trust.NotRegular as e:
        raise Unreadable(path, e.message, f"a {kind} is a regular TOML file") from None
    except trust.Refused as e:
        raise Unreadable(path, e.message, e.hint) from None
    except OSError as e:
        raise Unreadable(path, f"cannot read: {e.strerror}", "check the path and its permissions") from None
    try:
        chunks: list[bytes] = []
        size = 0
        while size <= MAX_BYTES and (chunk := os.read(fd, MAX_BYTES + 1 - size)):
            chunks.append(chunk)
            size += len(chunk)
    except OSError as e:
        raise Unreadable(path, f"cannot read: {e.strerror}", "check the path and its permissions") from None
    finally:
        os.close(fd)
    if size > MAX_BYTES:
        raise Unreadable(path, f"is larger than {MAX_BYTES // 1024} KiB", f"a VM {kind} is far smaller")
    try:
        return File(path, b"".join(chunks).decode("utf-8"), st)
    except UnicodeDecodeError as e:
        raise Unreadable(path, f"not UTF-8 text: {e.reason} at byte {e.start}") from None


def dropins(config: File) -> tuple[list[File], list[Unreadable]]:
    """The drop-ins of `config` in the order they apply, and every one that cannot be read;
    none when there is no drop-in directory. Unreadable when the directory itself is not one
    vmrun may trust."""
    where = directory(config.path)
    owner = config.st.st_uid
    try:
        fd, _ = trust.open_directory(where, owner)
    except FileNotFoundError:
        return [], []
    except trust.NotRegular:
        name = os.path.basename(config.path.rstrip("/"))
        raise Unreadable(where, "is not a directory", f"drop-ins of {name} go in a directory") from None
    except trust.Refused as e:
        raise Unreadable(where, e.message, e.hint) from None
    except OSError as e:
        raise Unreadable(where, f"cannot read: {e.strerror}", "check its permissions") from None
    try:
        names = sorted(n for n in os.listdir(fd) if is_dropin(n))
    finally:
        os.close(fd)
    files: list[File] = []
    problems: list[Unreadable] = []
    for name in names:
        try:
            files.append(read(os.path.join(where, name), owner, "drop-in"))
        except Unreadable as e:
            problems.append(e)
    return files, problems


def snapshot(path: str) -> list[list[object]]:
    """What the config loader would read for `path`, as plain data: each file's path, stat
    and text, or why it may not be read. The plan cache keeps a plan under this."""
    try:
        main = read(path, None)
    except Unreadable as e:
        return [[e.path, e.message]]
    out: list[list[object]] = [[main.path, main.ident(), main.text]]
    try:
        files, problems = dropins(main)
    except Unreadable as e:
        return [*out, [e.path, e.message]]
    out += [[f.path, f.ident(), f.text] for f in files]
    return out + [[p.path, p.message] for p in problems]
