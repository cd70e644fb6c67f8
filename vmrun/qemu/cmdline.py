"""QEMU command lines as QEMU reads them.

For `vmrun import`: options with their values (which options take none) and QEMU's comma
rules for `-device`/`-object`/... values. A running QEMU's command line and fds are read
from /proc by host/process.py.
"""

from __future__ import annotations

import attrs

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
