"""The one rule for a file that steers what vmrun does as root, and for the directories
vmrun keeps its own caches in.

Whoever can write a config, a drop-in, the drop-in directory or an attach fragment decides
what root opens, for which VM and as whom. So such a file is trusted only when it is owned
by root or by the config's owner (vmrun's own user counts as root: it lends nothing beyond
its own rights), nobody else may write it (no write bit for others, none for the group
unless the group is root's), and every directory above it passes the same test. A sticky
directory such as /tmp may be writable by all: there nobody can rename or remove an entry
they do not own; a file directly in one must then have a single name (a hard link planted
there is another file's second name).

The path is resolved here, one component at a time from /, each opened with O_PATH and
O_NOFOLLOW and judged by fstat of that descriptor; a symlink is followed only when it is
owned as the file must be, and its target is judged in turn. The file is then opened for
reading through the judged descriptor itself (/proc/self/fd/N), never by its name again:
what was judged is what is read. Nothing else in vmrun judges a file's trust.

This module is on the kept-plan launch's path: no attrs, no typing, no pathlib.
"""

from __future__ import annotations

import errno
import os
import stat

TYPE_CHECKING = False  # as in host/reader.py: typing itself costs a launch 15 ms

if TYPE_CHECKING:
    from collections.abc import Iterable

PATH_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
READ_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
MAX_LINKS = 40  # the kernel's own limit on symlinks in one lookup
KINDS = {
    stat.S_IFDIR: "a directory",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
    stat.S_IFLNK: "a symlink",
}


class Refused(Exception):
    """A file or directory that may not steer vmrun: what is wrong with it and the fix.
    `path` is the file that was asked for; the message may be about a directory above it."""

    def __init__(self, path: str, message: str, hint: str) -> None:
        super().__init__(f"{path}: {message} ({hint})")
        self.path = path
        self.message = message
        self.hint = hint


class NotRegular(Refused):
    """What the path names is not a regular file (a FIFO, a device, a directory)."""


def user_name(uid: int) -> str:
    import pwd

    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def user_word(uid: int) -> str:
    """The name chown takes for `uid`."""
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def group_name(gid: int) -> str:
    import grp

    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return f"gid {gid}"


def describe(st: os.stat_result) -> str:
    return f"owner {user_name(st.st_uid)}, group {group_name(st.st_gid)}, mode {stat.S_IMODE(st.st_mode):04o}"


class Owners:
    """Who may own what steers vmrun: root, vmrun's own user and `owner`.

    `owner` None: the owner of the file being opened (a config names itself; its directories
    must then belong to root, vmrun's user or that same owner), learnt once it is reached.
    """

    def __init__(self, owner: int | None) -> None:
        self.owner = owner

    def allowed(self, file_owner: int) -> frozenset[int]:
        return frozenset({0, os.geteuid(), file_owner if self.owner is None else self.owner})

    def words(self, allowed: Iterable[int]) -> str:
        others = sorted(u for u in allowed if u not in (0, os.geteuid()))
        mine = "" if os.geteuid() == 0 else f", {user_name(os.geteuid())} (vmrun's user)"
        theirs = f" or the config's owner, {user_name(others[0])}" if others else ""
        return f"root{mine}{theirs}"


def bits_problem(st: os.stat_result) -> str | None:
    """Who else may write what `st` describes; None when nobody may."""
    mode = stat.S_IMODE(st.st_mode)
    sticky = stat.S_ISDIR(st.st_mode) and mode & stat.S_ISVTX
    if mode & stat.S_IWOTH and not sticky:
        return "every user"
    if mode & stat.S_IWGRP and st.st_gid != 0 and not sticky:
        return f"group {group_name(st.st_gid)}"
    return None


def judge_bits(asked: str, here: str, st: os.stat_result, kind: str) -> None:
    """`kind`: "self" for the file (or directory) asked for, "dir" for one on its path."""
    writer = bits_problem(st)
    if writer is None:
        return
    flag = "o-w" if writer == "every user" else "g-w"
    if kind == "self":
        raise Refused(
            asked,
            f"is writable by {writer} ({describe(st)}): whoever writes it steers what vmrun does as root",
            f"chmod {flag} {here}",
        )
    raise Refused(
        asked,
        f"{here}, a directory on its path, is writable by {writer} ({describe(st)}): they could put another"
        " file in its place",
        f"chmod {flag} {here}; a directory shared by several users needs the sticky bit (chmod +t), as /tmp has",
    )


def judge_owner(asked: str, here: str, st: os.stat_result, kind: str, owners: Owners, allowed: frozenset[int]) -> None:
    """`kind`: "self", "dir" for a directory on the path, "link" for a symlink followed."""
    if st.st_uid in allowed:
        return
    who = owners.words(allowed)
    want = user_word(owners.owner if owners.owner is not None else 0)
    if kind == "self":
        raise Refused(
            asked,
            f"is owned by {user_name(st.st_uid)}, not by {who} ({describe(st)}): whoever owns it steers what vmrun"
            " does as root",
            f"chown {want} {here}, or remove it",
        )
    if kind == "link":
        raise Refused(
            asked,
            f"{here} is a symlink owned by {user_name(st.st_uid)}, not by {who}: vmrun follows a link only when it"
            " is owned as the file must be",
            f"replace the link by the file it names, or chown -h {want} {here}",
        )
    raise Refused(
        asked,
        f"{here}, a directory on its path, is owned by {user_name(st.st_uid)}, not by {who} ({describe(st)}):"
        " they could put another file in its place",
        f"chown {want} {here}",
    )


def shared(st: os.stat_result) -> bool:
    """A directory others may write into (one that passed the rule: a sticky one)."""
    mode = stat.S_IMODE(st.st_mode)
    return bool(mode & stat.S_IWOTH or (mode & stat.S_IWGRP and st.st_gid != 0))


def resolve(path: str, owners: Owners, want_dir: bool) -> tuple[int, os.stat_result]:
    """An O_PATH fd on what `path` names and its stat, after judging every component on the
    way and the object itself; raises Refused, NotRegular or OSError."""
    asked = path
    full = path if path.startswith("/") else os.path.join(os.getcwd(), path)
    pending = [c for c in reversed(full.split("/")) if c not in ("", ".")]
    root = os.open("/", PATH_FLAGS | os.O_DIRECTORY)
    stack: list[tuple[int, str, os.stat_result]] = [(root, "/", os.fstat(root))]
    # Every directory and link passed on the way, judged by owner once the owner is known.
    seen: list[tuple[str, os.stat_result, str]] = [("/", stack[0][2], "dir")]
    links = 0
    final: tuple[int, str, os.stat_result] | None = None
    try:
        judge_bits(asked, "/", stack[0][2], "dir")
        while pending:
            name = pending.pop()
            if name == "..":
                if len(stack) > 1:
                    os.close(stack.pop()[0])
                continue
            parent, parent_path, _ = stack[-1]
            here = os.path.join(parent_path, name)
            fd = os.open(name, PATH_FLAGS, dir_fd=parent)
            st = os.fstat(fd)
            if stat.S_ISLNK(st.st_mode):
                try:
                    links += 1
                    if links > MAX_LINKS:
                        raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), asked)
                    seen.append((here, st, "link"))
                    judge_now(asked, here, st, "link", owners)
                    target = os.readlink(name, dir_fd=parent)
                finally:
                    os.close(fd)
                if target.startswith("/"):
                    while len(stack) > 1:
                        os.close(stack.pop()[0])
                pending.extend(c for c in reversed(target.split("/")) if c not in ("", "."))
                continue
            if stat.S_ISDIR(st.st_mode) and pending:
                stack.append((fd, here, st))
                seen.append((here, st, "dir"))
                judge_bits(asked, here, st, "dir")
                judge_now(asked, here, st, "dir", owners)
                continue
            if pending:
                os.close(fd)
                raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), asked)
            final = (fd, here, st)
        if final is None:  # the path ends at / or at a directory through ".."
            fd, here, st = stack.pop()
            seen.pop()
            final = (fd, here, st)
        fd, here, st = final
        if want_dir != stat.S_ISDIR(st.st_mode) or not (want_dir or stat.S_ISREG(st.st_mode)):
            raise NotRegular(asked, f"is {KINDS.get(stat.S_IFMT(st.st_mode), 'not a regular file')}", "")
        judge_bits(asked, asked, st, "self")
        allowed = owners.allowed(st.st_uid)
        for where, seen_st, kind in seen:
            judge_owner(asked, where, seen_st, kind, owners, allowed)
        judge_owner(asked, asked, st, "self", owners, allowed)
        parent_st = stack[-1][2] if stack else st
        if shared(parent_st) and not want_dir and st.st_nlink != 1:
            raise Refused(
                asked,
                f"has {st.st_nlink} names, in a directory others may write ({describe(parent_st)}): one of them"
                " may have been planted there",
                "give it a name of its own: cp it to a new file and mv that over it",
            )
        return fd, st
    except BaseException:
        if final is not None:
            os.close(final[0])
        raise
    finally:
        for fd_, _, _ in stack:
            os.close(fd_)


def judge_now(asked: str, here: str, st: os.stat_result, kind: str, owners: Owners) -> None:
    """Owners known in advance are judged at once: nothing past a bad component is opened."""
    if owners.owner is not None:
        judge_owner(asked, here, st, kind, owners, owners.allowed(owners.owner))


def reopen(fd: int, st: os.stat_result, flags: int) -> int:
    """The judged object itself opened with `flags`: /proc/self/fd/N names that inode and no
    other, whatever happened to the path meanwhile."""
    new = os.open(f"/proc/self/fd/{fd}", flags)
    now = os.fstat(new)
    if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):  # pragma: no cover - /proc is the kernel's
        os.close(new)
        raise OSError(errno.ESTALE, "changed while it was opened")
    return new


def open_file(path: str, owner: int | None) -> tuple[int, os.stat_result]:
    """`path` opened to read, after the rule: see the module's docstring. `owner`: the config's
    owner (None for the config itself). Raises Refused, NotRegular or OSError (a missing or
    unreadable path)."""
    fd, st = resolve(path, Owners(owner), want_dir=False)
    try:
        return reopen(fd, st, READ_FLAGS), st
    finally:
        os.close(fd)


def open_directory(path: str, owner: int | None) -> tuple[int, os.stat_result]:
    """The directory `path` opened to list, after the same rule."""
    fd, st = resolve(path, Owners(owner), want_dir=True)
    try:
        return reopen(fd, st, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC), st
    finally:
        os.close(fd)
