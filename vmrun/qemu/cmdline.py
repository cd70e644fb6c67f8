"""QEMU command lines as QEMU reads them, and a running QEMU's command line and fds.

For `vmrun import`: options with their values (which options take none), QEMU's comma
rules for `-device`/`-object`/... values, and from /proc what a process was started with,
what each of its fds is open on and which user it runs as.
"""

from __future__ import annotations

import os
import re

import attrs

from vmrun.host import facts as host

# QEMU options that take no value; every other option takes one.
FLAGS = frozenset(
    [
        "-nodefaults",
        "-no-user-config",
        "-S",
        "-no-reboot",
        "-no-shutdown",
        "-nographic",
        "-enable-kvm",
        "-snapshot",
        "-daemonize",
        "-no-hpet",
        "-no-acpi",
        "-full-screen",
        "-s",
        "-usb",
        "-preconfig",
        "-only-migratable",
        "-nodefconfig",
        "-no-quit",
    ]
)
Props = list[tuple[str, str | None]]


@attrs.frozen
class FdInfo:
    """What an fd on the command line is open on; path None: not known (the caller's)."""

    path: str | None
    ifname: str | None = None  # a tap's interface (fdinfo's iff)


def keyvals(text: str) -> Props:
    """QEMU's `a,b=c,d=e,,f` split as QEMU does (`,,` is a comma); a part without `=` has value None."""
    parts: list[str] = []
    current = ""
    i = 0
    while i < len(text):
        if text[i] == ",":
            if text[i + 1 : i + 2] == ",":
                current += ","
                i += 2
                continue
            parts.append(current)
            current = ""
        else:
            current += text[i]
        i += 1
    parts.append(current)
    return [(k, v) if sep else (k, None) for k, sep, v in (p.partition("=") for p in parts)]


def options(argv: list[str]) -> tuple[str | None, list[tuple[str, ...]]]:
    """The binary (when argv starts with one) and the options, each with its value."""
    binary = argv[0] if argv and not argv[0].startswith("-") else None
    rest = argv[1:] if binary is not None else argv
    out: list[tuple[str, ...]] = []
    i = 0
    while i < len(rest):
        arg = rest[i]
        name = "-" + arg.lstrip("-") if arg.startswith("-") else arg
        if arg.startswith("-") and name not in FLAGS and i + 1 < len(rest):
            out.append((name, rest[i + 1]))
            i += 2
        else:
            out.append((name,))
            i += 1
    return binary, out


def from_pid(pid: int, host_view: host.Host) -> tuple[list[str], dict[int, FdInfo], str | None]:
    """A running QEMU's command line, what its fds are open on, and the user it runs as."""
    import pwd

    raw = host_view.under(f"/proc/{pid}/cmdline").read_bytes()
    argv = [a.decode(errors="surrogateescape") for a in raw.split(b"\0")[:-1]]
    fds: dict[int, FdInfo] = {}
    fd_dir = host_view.under(f"/proc/{pid}/fd")
    for entry in os.listdir(fd_dir):
        if not entry.isdigit():
            continue
        try:
            target = os.readlink(fd_dir / entry)
        except OSError:
            continue
        ifname = None
        info = host_view.read(f"/proc/{pid}/fdinfo/{entry}") or ""
        if m := re.search(r"^iff:\s*(\S+)", info, re.MULTILINE):
            ifname = m[1]
        fds[int(entry)] = FdInfo(target if target.startswith("/") else None, ifname)
    user = None
    status = host_view.read(f"/proc/{pid}/status") or ""
    if (m := re.search(r"^Uid:\s*([0-9]+)", status, re.MULTILINE)) and m[1] != "0":
        try:
            user = pwd.getpwuid(int(m[1])).pw_name
        except KeyError:
            user = None
    return argv, fds, user
