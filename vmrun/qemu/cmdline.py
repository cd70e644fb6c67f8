"""QEMU command lines as QEMU reads them.

For `vmrun import`: options with their values (which options take none) and QEMU's comma
rules for `-device`/`-object`/... values. A running QEMU's command line and fds are read
from /proc by host/process.py.
"""

from __future__ import annotations

import json

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


# The key QEMU's JSON syntax (libvirt's) names what key=value writes first and bare:
# `-device '{"driver":"vfio-pci",...}'` is `-device vfio-pci,...`.
IMPLIED_KEY = {
    "-device": "driver",
    "-object": "qom-type",
    "-netdev": "type",
    "-chardev": "backend",
    "-audiodev": "driver",
}


def option_props(option: str, value: str) -> Props:
    """The value of `option` as key=value props, whichever syntax it was written in: QEMU's
    key=value, or the JSON that libvirt writes for -device, -object, -blockdev, -netdev,
    -chardev and -audiodev. JSON's nested objects become dotted keys (`cache.direct`), its
    lists repeated keys (`hostfwd`) or QEMU's list syntax (`host-nodes=0-1`), its booleans
    on/off; a value that is not a JSON object stays key=value."""
    text = value.strip()
    if not text.startswith("{"):
        return keyvals(value)
    try:
        data = json.loads(text)
    except ValueError:
        return keyvals(value)
    if not isinstance(data, dict):
        return keyvals(value)
    implied = IMPLIED_KEY.get(option)
    props: Props = []
    if implied is not None and isinstance(data.get(implied), str):
        props.append((data.pop(implied), None))
    flatten(data, "", props)
    return props


def flatten(data: dict[str, object], prefix: str, props: Props) -> None:
    for key, item in data.items():
        name = f"{prefix}{key}"
        if isinstance(item, dict):
            if list(item) == ["str"]:  # QAPI's string wrapper, e.g. hostfwd entries
                props.append((name, scalar(item["str"])))
            else:
                flatten(item, f"{name}.", props)
        elif isinstance(item, list):
            if all(isinstance(x, int) and not isinstance(x, bool) for x in item):
                props.append((name, ",".join(str(x) for x in item)))  # host-nodes: [0, 1]
            else:
                for x in item:
                    props.append((name, scalar(x["str"] if isinstance(x, dict) and "str" in x else x)))
        else:
            props.append((name, scalar(item)))


def scalar(value: object) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if value is None:
        return ""
    return str(value)


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
