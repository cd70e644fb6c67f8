"""Read a VM config (TOML) into the validated model, reporting every problem at once.

One table per section says which keys exist, how each is parsed and what it means, so
parsing, the did-you-mean for unknown keys and the documentation cannot drift apart.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import pathlib
import re
import sys
import tomllib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import attrs

from vmrun import config_files, dropins  # at import time: a de-privileged caller may not read the package later
from vmrun.errors import ConfigError
from vmrun.model import Config, Disk, Forward, Iommufd, Memlock, Net, Vfio, Vm
from vmrun.problems import Problem, Sources
from vmrun.sizes import (
    HUGEPAGE_SIZES,
    SIZE_PATTERN,
    KiB,
    MiB,
    SizeError,
    TiB,
    format_size,
    is_size_shaped,
    parse_size,
)

# Every pattern is applied with fullmatch: `$` would let a trailing newline through.
# QEMU accepts ids that start with a letter and go on with letters, digits, '-', '.', '_'.
ID_RE = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*")
ID_MAX = 63
# Planner.disk (vmrun/plan.py) names a disk's block nodes ID-file and ID-fmt, and those of
# its backing layers ID-bK-file and ID-bK-fmt, K up to host.MAX_BACKING_DEPTH (16); QEMU's
# node names have at most 31 characters.
DISK_ID_MAX = 31 - len("-b16-file")
# Ids vmrun/plan.py gives its own devices, chardevs and block nodes: a config must not take
# them, or QEMU would refuse the duplicate, or wire the wrong thing together.
RESERVED_IDS = {
    "scsi0": "the SCSI controller of scsi disks",  # Planner.disk, -device virtio-scsi-pci
    "viommu0": "the vIOMMU",  # Planner.build, -device intel-iommu / virtio-iommu-pci
    "video0": "the video card of a display",  # Planner.display, -device VGA
    "fw-code": "the UEFI code's block node",  # Planner.firmware, -blockdev (and fw-code-file)
    "fw-vars": "the UEFI variable store's block node",  # Planner.firmware, -blockdev (and fw-vars-file)
    "console": "the serial console's chardev",  # Planner.console, -chardev
    "vmrun-qmp": "vmrun's QMP chardev",  # Planner.state_fds, -chardev (plan.QMP_CHARDEV)
    "guest-ram": "the guest RAM's memory backend",  # placement.RAM_ID, -object memory-backend-*
}
# ID-b1, ID-b2, ...: the backing layers' node names, from Planner.disk.
BACKING_NODE_RE = re.compile(r".*-b[0-9]+")
# hotplug0, hotplug1, ...: the empty root ports, from Planner.hotplug_ports (plan.HOTPLUG_PORT).
HOTPLUG_PORT_RE = re.compile(r"hotplug[0-9]+")
# A letter or digit first: the name is a directory under the state base, never "." or
# ".."; at most 64 characters, so every socket path under it fits sun_path.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
NAME_MAX = 64
USER_RE = re.compile(r"[a-z_][a-z0-9_-]{0,31}\$?")
SERIAL_RE = re.compile(r"[A-Za-z0-9_.-]{1,20}")
IFNAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,15}")
MACHINE_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
PCI_RE = re.compile(r"(?:(?P<domain>[0-9a-fA-F]{4}):)?(?P<bus>[0-9a-fA-F]{2}):(?P<dev>[0-1][0-9a-fA-F])\.(?P<fn>[0-7])")
ACCELS = ("kvm", "tcg")
DRIVERS = ("vfio-pci", "vfio-platform", "vfio-ap", "vfio-ccw")
# Device properties that vmrun sets itself from the config's own keys. `driver` too: QEMU
# takes the last of two, so props.driver would make the device another one.
PLANNED_PROPS = frozenset({"driver", "id", "host", "sysfsdev", "fd", "iommufd"})
FIRST_FREE_FD = 3


class Invalid(Exception):
    def __init__(self, message: str, hint: str | None = None, sub: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.sub = sub  # a path below the key, e.g. ".x-vga" for one entry of a table


class InvalidMany(Exception):
    def __init__(self, errors: list[Invalid]) -> None:
        super().__init__(errors)
        self.errors = errors


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


@attrs.frozen
class Traits:
    """What a parser takes, as JSON Schema (for `vmrun schema`), and how a value it made is
    written back as TOML (for `vmrun show`); kept beside the parser so neither can drift."""

    schema: dict[str, Any]
    dump: Callable[[Any], Any] | None = None


TRAITS: dict[Callable[..., Any], Traits] = {}
P = TypeVar("P", bound=Callable[..., Any])


def described(schema: dict[str, Any], dump: Callable[[Any], Any] | None = None) -> Callable[[P], P]:
    """Registers the Traits of the parser it decorates (or is called on)."""

    def register(parse: P) -> P:
        TRAITS[parse] = Traits(schema, dump)
        return parse

    return register


def json_pattern(pattern: re.Pattern[str] | str) -> str:
    """A Python pattern applied with fullmatch, as a JSON Schema (ECMA-262) pattern: anchored,
    named groups plain, so both dialects read it alike."""
    text = pattern if isinstance(pattern, str) else pattern.pattern
    return "^(?:" + re.sub(r"\(\?P<\w+>", "(", text) + ")$"


def expect(value: object, kind: type, what: str) -> Any:
    # bool is an int in Python but not in TOML: `cpus = true` must not pass as 1.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise Invalid(f"expected {what}, got {toml_type(value)} {shown(value)}")
    return value


CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
NO_NUL = "^[^\\x00]*$"
NO_CONTROL = "^[^\\x00-\\x1f\\x7f]*$"


def no_nul(text: str, sub: str = "") -> str:
    """A string that can become an argument or environment entry: a NUL would end it early."""
    if "\0" in text:
        raise Invalid("contains a NUL character", "remove it", sub)
    return text


@described({"type": "string", "pattern": json_pattern(NAME_RE)})
def vm_name(value: object, ctx: Context) -> str:
    text: str = string()(value, ctx)
    if len(text) > NAME_MAX:
        raise Invalid(
            f"is {len(text)} characters long, at most {NAME_MAX}",
            "the name becomes a state directory and part of socket paths; pick a shorter one",
        )
    return str(string(NAME_RE, "start with a letter or digit; then letters, digits, '-', '.' and '_'")(text, ctx))


def string(pattern: re.Pattern[str] | None = None, hint: str | None = None, controls: bool = True) -> Parser:
    """A non-empty string, matching `pattern` whole; never a NUL, and with controls=False no
    control character at all (paths, where a newline or escape is never meant)."""

    def parse(value: object, ctx: Context) -> str:
        text: str = no_nul(expect(value, str, "a string"))
        if not text:
            raise Invalid("must not be empty", hint)
        if not controls and CONTROL_RE.search(text):
            raise Invalid(f"{shown(text)} contains a control character", "remove it")
        if pattern is not None and not pattern.fullmatch(text):
            raise Invalid(f"{shown(text)} is not allowed here", hint)
        return text

    shape = json_pattern(pattern) if pattern is not None else NO_NUL if controls else NO_CONTROL
    return described({"type": "string", "minLength": 1, "pattern": shape})(parse)


def integer(low: int, high: int, hint: str | None = None) -> Parser:
    def parse(value: object, ctx: Context) -> int:
        number: int = expect(value, int, "an integer")
        if not low <= number <= high:
            raise Invalid(f"{shown(number)} is out of range {low}..{high}", hint)
        return number

    return described({"type": "integer", "minimum": low, "maximum": high})(parse)


def choice(*options: str) -> Parser:
    def parse(value: object, ctx: Context) -> str:
        text: str = expect(value, str, "a string")
        if text not in options:
            raise Invalid(f"{shown(text)} is not one of {', '.join(options)}", did_you_mean(text, options))
        return text

    return described({"type": "string", "enum": list(options)})(parse)


def size(unit: int, unit_name: str, low: int, high: int) -> Parser:
    """A size in bytes, a whole number of `unit`, between `low` and `high`."""

    def parse(value: object, ctx: Context) -> int:
        text: str = expect(value, str, 'a size string such as "512M" or "8G"')
        try:
            n = parse_size(text)
        except SizeError as e:
            raise Invalid(
                f"{shown(text)} {e.reason}", 'write a number with K, M, G or T, e.g. "512M" or "8G"'
            ) from None
        whole = [k * unit for k in (n // unit, n // unit + 1) if low <= k * unit <= high]
        if n % unit and whole:
            raise Invalid(
                f"{shown(text)} is {n} bytes, not a whole number of {unit_name}",
                f"round it to whole {unit_name}: " + " or ".join(f'"{format_size(k)}"' for k in whole),
            )
        if not low <= n <= high:
            raise Invalid(f"{shown(text)} is out of range {format_size(low)}..{format_size(high)}")
        return n

    return described({"type": "string", "pattern": SIZE_PATTERN}, format_size)(parse)


# QEMU takes guest RAM in MiB; 16T is beyond any host vmrun passes devices through on.
memory_size = size(MiB, "MiB", MiB, 16 * TiB)
# setrlimit counts bytes but the kernel pins pages: KiB is the finest grain worth writing.
memlock_size = size(KiB, "KiB", KiB, 64 * TiB)


@described(
    {"type": "string", "anyOf": [{"enum": ["auto", "unlimited", "off"]}, {"pattern": SIZE_PATTERN}]},
    lambda m: m.mode if m.size is None else format_size(m.size),
)
def memlock(value: object, ctx: Context) -> Memlock:
    if isinstance(value, str) and value in ("auto", "unlimited", "off"):
        return Memlock(mode=value)  # type: ignore[arg-type]
    if not isinstance(value, str) or not is_size_shaped(value):
        raise Invalid(
            f"{shown(value)} is not a memlock setting", 'use "auto", "unlimited", "off" or a size such as "9G"'
        )
    return Memlock(mode="size", size=memlock_size(value, ctx))


# Linux's MAX_NUMNODES is at most 1024 (NODES_SHIFT 10).
MAX_NUMA_NODE = 1023


@described(
    {
        "type": ["string", "integer"],
        "anyOf": [
            {"type": "string", "enum": ["auto", "off"]},
            {"type": "integer", "minimum": 0, "maximum": MAX_NUMA_NODE},
        ],
    }
)
def numa(value: object, ctx: Context) -> str | int:
    if value in ("auto", "off"):
        return str(value)
    if isinstance(value, int) and not isinstance(value, bool):
        if not 0 <= value <= MAX_NUMA_NODE:
            raise Invalid(f"{shown(value)} is out of range 0..{MAX_NUMA_NODE}", "a host NUMA node as lscpu shows it")
        return value
    raise Invalid(
        f"{shown(value)} is not a NUMA setting",
        'use "auto" (next to the devices), "off", or a host node number such as 1',
    )


@described({"type": "string", "minLength": 1, "pattern": NO_CONTROL}, str)
def file_path(value: object, ctx: Context) -> pathlib.Path:
    text = string(controls=False)(value, ctx)
    try:
        path = pathlib.Path(text).expanduser()
    except RuntimeError:  # ~user of a user this host does not have
        raise Invalid(f"{shown(text)}: no home directory for {text.split('/')[0]}", "write the path in full") from None
    # Relative paths are relative to the config file, so a checked-in config works from any cwd.
    return pathlib.Path(os.path.normpath(path if path.is_absolute() else ctx.base / path))


@described({"type": "string", "minLength": 1, "pattern": NO_CONTROL})
def qemu_binary(value: object, ctx: Context) -> str:
    text = string(controls=False)(value, ctx)
    return str(file_path(text, ctx)) if "/" in text else text


@described({"type": "array", "items": {"type": "string", "pattern": NO_NUL}}, list)
def string_list(value: object, ctx: Context) -> tuple[str, ...]:
    """Every bad item is its own problem, at `key[i]`."""
    items: list[object] = expect(value, list, "an array of strings")
    errors: list[Invalid] = []
    for i, item in enumerate(items):
        if not isinstance(item, str):
            errors.append(Invalid(f"is {toml_type(item)} {shown(item)}, expected a string", sub=f"[{i}]"))
        elif "\0" in item:
            errors.append(Invalid("contains a NUL character", "remove it", f"[{i}]"))
    if errors:
        raise InvalidMany(errors)
    return tuple(str(i) for i in items)


@described({"type": "string", "pattern": json_pattern(PCI_RE)})
def pci_address(value: object, ctx: Context) -> str:
    text: str = expect(value, str, "a PCI address string")
    m = PCI_RE.fullmatch(text)
    if not m:
        raise Invalid(
            f"{shown(text)} is not a PCI address",
            'write DDDD:BB:DD.F or BB:DD.F as `lspci -D` shows it, e.g. "0000:01:00.0"',
        )
    domain = (m["domain"] or "0000").lower()
    return f"{domain}:{m['bus'].lower()}:{m['dev'].lower()}.{m['fn']}"


@described({"type": "string", "pattern": json_pattern(MACHINE_RE)})
def cpu_model(value: object, ctx: Context) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        raise Invalid(f"is the CPU model, a string, not {shown(value)}", "the number of vCPUs is `cpus`")
    model: str = string(MACHINE_RE, "a QEMU CPU model such as max or host")(value, ctx)
    return model


@described({"type": "boolean"})
def boolean(value: object, ctx: Context) -> bool:
    flag: bool = expect(value, bool, "true or false")
    return flag


# [0-9], not \d: \d takes any script's digits, which int() reads but QEMU does not.
FORWARD_RE = re.compile(r"(?:(tcp|udp):)?(?:([0-9]{1,3}(?:\.[0-9]{1,3}){3}):)?([0-9]{1,5}):([0-9]{1,5})")
FORWARD_HINT = 'write [PROTO:][HOSTADDR:]HOSTPORT:GUESTPORT, e.g. "tcp:2222:22" or "udp:0.0.0.0:5353:53"'


@described(
    {"type": "array", "items": {"type": "string", "pattern": json_pattern(FORWARD_RE)}},
    lambda fs: [f"{f.protocol}:{f.host_addr}:{f.host_port}:{f.guest_port}" for f in fs],
)
def forwards(value: object, ctx: Context) -> tuple[Forward, ...]:
    """Every bad item is its own problem, at `forwards[i]`."""
    items: list[object] = expect(value, list, 'an array of port forwards, e.g. ["tcp:2222:22"]')
    out = []
    errors: list[Invalid] = []
    for i, item in enumerate(items):
        try:
            out.append(forward(item))
        except Invalid as e:
            errors.append(Invalid(e.message, e.hint, f"[{i}]"))
    if errors:
        raise InvalidMany(errors)
    return tuple(out)


def forward(item: object) -> Forward:
    if not isinstance(item, str):
        raise Invalid(f"is {toml_type(item)} {shown(item)}, expected a string", FORWARD_HINT)
    m = FORWARD_RE.fullmatch(item)
    if not m or not all(0 < int(port) < 65536 for port in (m[3], m[4])):
        raise Invalid(f"{shown(item)} is not a port forward", FORWARD_HINT)
    address = "127.0.0.1"
    if m[2]:
        try:
            # Python's parser refuses leading zeros; QEMU's inet_aton would read 010 as octal 8.
            address = str(ipaddress.IPv4Address(m[2]))
        except ValueError:
            raise Invalid(
                f"{shown(item)}: {m[2]} is not an IPv4 address", "four numbers 0-255 without leading zeros"
            ) from None
    return Forward(m[1] or "tcp", address, int(m[3]), int(m[4]))


MAC_RE = re.compile(r"[0-9a-fA-F]{2}(?::[0-9a-fA-F]{2}){5}")


@described({"type": "string", "pattern": json_pattern(MAC_RE)})
def mac_address(value: object, ctx: Context) -> str:
    text: str = expect(value, str, "a MAC address string")
    if not MAC_RE.fullmatch(text):
        raise Invalid(f"{shown(text)} is not a MAC address", 'write six hex pairs, e.g. "52:54:00:12:34:56"')
    if int(text[:2], 16) & 1:
        raise Invalid(f"{shown(text)} is a multicast address", "the first byte of a NIC's address must be even")
    return text.lower()


@described({"type": "string", "pattern": "^/sys/[^\\x00-\\x1f\\x7f]*$"})
def sysfs_path(value: object, ctx: Context) -> str:
    text: str = string(controls=False)(value, ctx)
    hint = 'give the device\'s directory under /sys, e.g. "/sys/bus/pci/devices/0000:01:00.0"'
    # vmrun reads the device's links under it as root: '..' must not lead out of /sys.
    if ".." in text.split("/"):
        raise Invalid(f"{shown(text)} has a '..' component", hint)
    path = os.path.normpath(text)
    if not path.startswith("/sys/"):
        raise Invalid(f"{shown(text)} is not a sysfs path", hint)
    return path


ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Set by vmrun from the user QEMU runs as.
ENV_RESERVED = frozenset({"HOME", "USER", "LOGNAME"})


@described(
    {
        "type": "object",
        "propertyNames": {"pattern": json_pattern(ENV_NAME_RE), "not": {"enum": sorted(ENV_RESERVED)}},
        "additionalProperties": {"type": "string", "pattern": NO_NUL},
    },
    dict,
)
def environment(value: object, ctx: Context) -> tuple[tuple[str, str], ...]:
    table: dict[str, object] = expect(value, dict, 'a table of environment variables, e.g. { RUST_LOG = "info" }')
    out: list[tuple[str, str]] = []
    errors: list[Invalid] = []
    for name, item in table.items():
        sub = key_part(name)
        if not ENV_NAME_RE.fullmatch(name):
            errors.append(Invalid("is not an environment variable name", "letters, digits and '_'", sub))
        elif name in ENV_RESERVED:
            errors.append(Invalid("is set by vmrun from vm.user", "drop it", sub))
        elif not isinstance(item, str):
            errors.append(Invalid(f"is {toml_type(item)} {shown(item)}, expected a string", sub=sub))
        elif "\0" in item:
            errors.append(Invalid("contains a NUL character", "remove it", sub))
        else:
            out.append((name, item))
    if errors:
        raise InvalidMany(errors)
    return tuple(out)


# QEMU's integer properties are int64 or uint64.
PROP_INT_MIN, PROP_INT_MAX = -(2**63), 2**64 - 1
caller_fd = integer(FIRST_FREE_FD, 65535, "fds 0-2 are stdin, stdout and stderr; pass the device on 3 or above")


@described(
    {
        "type": "object",
        "propertyNames": {"pattern": json_pattern(ID_RE), "not": {"enum": sorted(PLANNED_PROPS)}},
        "additionalProperties": {"type": ["string", "integer", "boolean"]},
    },
    dict,
)
def props(value: object, ctx: Context) -> tuple[tuple[str, str | int | bool], ...]:
    table: dict[str, object] = expect(value, dict, "a table of device properties")
    out: list[tuple[str, str | int | bool]] = []
    errors: list[Invalid] = []
    for key, item in table.items():
        sub = key_part(key)
        if key in PLANNED_PROPS:
            errors.append(Invalid("is set by vmrun", f"use the device's own `{key}` key instead", sub))
        elif not ID_RE.fullmatch(key):
            errors.append(Invalid("is not a property name", ID_HINT, sub))
        elif not isinstance(item, str | int | bool):
            errors.append(
                Invalid(
                    f"is {toml_type(item)} {shown(item)}, expected a string, integer or boolean",
                    sub=sub,
                )
            )
        elif isinstance(item, str) and "\0" in item:
            errors.append(Invalid("contains a NUL character", "remove it", sub))
        elif isinstance(item, int) and not isinstance(item, bool) and not PROP_INT_MIN <= item <= PROP_INT_MAX:
            errors.append(Invalid(f"{shown(item)} does not fit in 64 bits, as QEMU's integer properties do", sub=sub))
        else:
            out.append((key, item))
    if errors:
        raise InvalidMany(errors)
    return tuple(out)


@attrs.frozen
class Context:
    base: pathlib.Path  # the config file's directory


Parser = Callable[[object, Context], Any]


@attrs.frozen
class Key:
    name: str
    parse: Parser
    doc: str
    required: bool = False


ID_HINT = "start with a letter; then letters, digits, '-', '.' or '_'"

VM_KEYS = (
    Key("name", vm_name, "unique name of the VM", required=True),
    Key("memory", memory_size, 'guest RAM in whole MiB, e.g. "8G"', required=True),
    Key("cpus", integer(1, 1024), "number of vCPUs (default 1)"),
    Key(
        "machine",
        string(MACHINE_RE, "a QEMU machine type such as q35"),
        "QEMU machine type (default q35)",
    ),
    Key("accel", choice(*ACCELS), "accelerator: kvm (default) or tcg"),
    Key("qemu", qemu_binary, "QEMU binary, a name on PATH or a path (default qemu-system-x86_64)"),
    Key(
        "user",
        string(USER_RE, "a user name such as nobody"),
        "run QEMU as this user (vmrun as root)",
    ),
    Key("cpu", cpu_model, "CPU model (default: host under kvm, QEMU's under tcg)"),
    Key("console", choice("stdio", "socket", "none"), "serial console: stdio (default), socket or none"),
    Key("display", choice("none", "vnc", "gtk", "sdl"), "display: none (default), vnc, gtk or sdl"),
    Key("firmware", choice("bios", "uefi"), "bios (default) or uefi (OVMF)"),
    Key("uefi_vars", file_path, "the VM's own UEFI variable store (made from the template when missing)"),
    Key("viommu", choice("intel", "virtio"), "a virtual IOMMU for the guest: intel or virtio"),
    Key("memlock", memlock, 'RLIMIT_MEMLOCK: "auto" (default), "unlimited", "off" or a size'),
    Key("kernel", file_path, "kernel image for direct boot (relative to the config file)"),
    Key("initrd", file_path, "initial ramdisk for direct boot"),
    Key("append", string(), "kernel command line for direct boot"),
    Key("args", string_list, "raw QEMU arguments appended last (escape hatch)"),
    Key("env", environment, "environment variables added to QEMU's minimal environment"),
    Key("sandbox", boolean, "QEMU's seccomp sandbox (default true)"),
    Key("hotplug_slots", integer(0, 32), "empty PCIe root ports for `vmrun attach` (q35 only; default 4 on q35)"),
    Key("hugepages", choice("off", *HUGEPAGE_SIZES), 'guest RAM on huge pages: "off" (default), "2M" or "1G"'),
    Key(
        "prealloc", boolean, "fault in all guest RAM at start, one thread per vCPU (default false; on with huge pages)"
    ),
    Key("numa", numa, 'host NUMA node of guest RAM and QEMU\'s CPUs: "auto" (default: the devices\' node), "off" or N'),
)
IOMMUFD_KEYS = (
    Key("id", string(ID_RE, ID_HINT), "id of the iommufd object", required=True),
    Key("fd", caller_fd, "an fd on /dev/iommu that the caller opened and vmrun passes on"),
)
VFIO_KEYS = (
    Key("id", string(ID_RE, ID_HINT), "id of the device", required=True),
    Key(
        "driver",
        choice(*DRIVERS),
        "QEMU device: vfio-pci (default), vfio-platform, vfio-ap, vfio-ccw",
    ),
    Key("host", pci_address, "PCI address, DDDD:BB:DD.F"),
    Key("sysfsdev", sysfs_path, "the device's sysfs directory"),
    Key("fd", caller_fd, "an fd on the device's VFIO cdev that the caller opened"),
    Key("iommufd", string(ID_RE, ID_HINT), "id of an [[iommufd]]; absent: legacy VFIO container"),
    Key("props", props, "extra device properties, e.g. { x-vga = true }"),
)
DISK_KEYS = (
    Key("id", string(ID_RE, ID_HINT), "id of the disk", required=True),
    Key("path", file_path, "image file (relative to the config file)", required=True),
    Key("format", choice("raw", "qcow2"), "image format: raw (default) or qcow2"),
    Key("interface", choice("virtio-blk", "nvme", "scsi"), "virtio-blk (default), nvme or scsi"),
    Key("readonly", boolean, "attach read-only (default false)"),
    Key("cache", choice("writeback", "none", "unsafe"), "host cache: writeback (default), none (O_DIRECT), unsafe"),
    Key("serial", string(SERIAL_RE, "letters, digits, '-', '_', '.', at most 20"), "serial number the guest sees"),
    Key("trusted", boolean, "vmrun opens the image and its backing files as root, not as vm.user (default false)"),
)
NET_KEYS = (
    Key("id", string(ID_RE, ID_HINT), "id of the network device", required=True),
    Key("type", choice("user", "tap"), "user (default: NAT, no privileges) or tap"),
    Key("forwards", forwards, 'user: host ports forwarded to the guest, e.g. ["tcp:2222:22"]'),
    Key("ifname", string(IFNAME_RE, "an interface name such as tap0"), "tap: an existing tap interface"),
    Key("mac", mac_address, "MAC address (default: derived from the VM and device names)"),
    Key("model", choice("virtio-net-pci", "e1000e", "e1000"), "NIC model: virtio-net-pci (default), e1000e, e1000"),
)
SECTIONS = {"vm": "table", "iommufd": "array", "vfio": "array", "disk": "array", "net": "array"}
SECTION_KEYS = {"vm": VM_KEYS, "iommufd": IOMMUFD_KEYS, "vfio": VFIO_KEYS, "disk": DISK_KEYS, "net": NET_KEYS}


def did_you_mean(word: str, options: tuple[str, ...] | list[str] | Mapping[str, object]) -> str | None:
    import difflib  # only for a config with a typo

    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}?" if close else None


class Reader:
    """Walks the raw TOML, collecting problems instead of stopping at the first."""

    def __init__(self, sources: Sources, base: pathlib.Path | None = None) -> None:
        self.sources = sources
        # Relative paths of the config itself start here (default: its directory).
        self.base = base or pathlib.Path(sources.main).absolute().parent
        self.problems: list[Problem] = []

    def problem(self, path: str, message: str, hint: str | None = None) -> None:
        self.problems.append(Problem(path, message, hint, self.sources.dropin_of(path)))

    def context(self, path: str) -> Context:
        # A relative path is relative to the file it is written in, drop-ins included.
        dropin = self.sources.dropin_of(path)
        return Context(base=pathlib.Path(dropin).absolute().parent if dropin else self.base)

    def table(self, raw: dict[str, Any], keys: tuple[Key, ...], path: str) -> dict[str, Any]:
        known = {k.name: k for k in keys}
        values: dict[str, Any] = {}
        for name, value in raw.items():
            key = known.get(name)
            if key is None:
                hint = did_you_mean(name, known) or f"known keys: {', '.join(known)}"
                if name.lower() in known:
                    hint = f"did you mean {name.lower()!r}? keys are lower case"
                self.problem(f"{path}{key_part(name)}", "unknown key", hint)
                continue
            try:
                values[name] = key.parse(value, self.context(f"{path}.{name}"))
            except Invalid as e:
                self.problem(f"{path}.{name}{e.sub}", e.message, e.hint)
            except InvalidMany as many:
                for sub in many.errors:
                    self.problem(f"{path}.{name}{sub.sub}", sub.message, sub.hint)
        for key in keys:
            if key.required and key.name not in raw:
                self.problem(f"{path}.{key.name}", "is required", key.doc)
        return values

    def array(self, raw: dict[str, Any], name: str, keys: tuple[Key, ...]) -> list[Entry]:
        items = raw.get(name, [])
        if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
            self.problem(name, "must be an array of tables", f"write each entry as [[{name}]]")
            return []
        return [Entry(item, self.table(item, keys, f"{name}[{i}]")) for i, item in enumerate(items)]


@attrs.frozen
class Entry:
    """One [[...]] entry: the keys as written, and the values that parsed."""

    raw: dict[str, Any]
    values: dict[str, Any]


def read_file(path: pathlib.Path, owner: int | None, kind: str = "config") -> config_files.File:
    """A file of a config (the config itself when `owner` is None), read under the trust rule
    (see trust.py): a ConfigError naming it when it may not or cannot be read."""
    try:
        return config_files.read(str(path), owner, kind)
    except config_files.Unreadable as e:
        raise ConfigError(str(path), [Problem("", e.message, e.hint)]) from None


def load(path: pathlib.Path | str) -> Config:
    """The validated config in `path` with its drop-ins (`PATH.d/*.toml`) merged in;
    raises ConfigError listing every problem, each naming the file that set the key."""
    path = pathlib.Path(path)
    main = read_file(path, None)
    raw, sources = dropins.merged(path, read_toml(main.text, path), main)
    return attrs.evolve(validate(raw, path, sources), owner=main.st.st_uid)


def parse(text: str, path: pathlib.Path) -> Config:
    """The validated config in the TOML `text`, read from `path` (no drop-ins)."""
    return validate(read_toml(text, path), path, Sources(str(path)))


def read_toml(text: str, path: pathlib.Path) -> dict[str, Any]:
    """The TOML document in `text`, or a ConfigError that names `path`."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(str(path), [toml_syntax_problem(e)]) from None
    except RecursionError:
        raise ConfigError(
            str(path), [Problem("", "arrays or tables are nested too deeply", "a VM config needs a few levels")]
        ) from None
    except ValueError:
        # Not a syntax error: Python refuses to convert a decimal integer this long.
        raise ConfigError(
            str(path),
            [
                Problem(
                    "",
                    f"a number has more than {sys.get_int_max_str_digits()} digits",
                    "numbers in a VM config have a few digits",
                )
            ],
        ) from None


def validate(raw: dict[str, Any], path: pathlib.Path, sources: Sources) -> Config:
    """The config model of the (merged) document `raw`; `sources` says who wrote each key."""
    reader = Reader(sources)
    for name in raw:
        if name not in SECTIONS:
            hint = did_you_mean(name, SECTIONS) or "sections are [vm], [[iommufd]], [[vfio]], [[disk]] and [[net]]"
            reader.problem(key_part(name)[1:], "unknown section", hint)
    vm_raw = raw.get("vm")
    if not isinstance(vm_raw, dict):
        if vm_raw is None:
            reader.problem("vm", "is required", "add a [vm] table with at least name and memory")
        else:
            reader.problem("vm", "must be a table", "write it as [vm]")
        vm_raw = {}
    vm = reader.table(vm_raw, VM_KEYS, "vm")
    objects = reader.array(raw, "iommufd", IOMMUFD_KEYS)
    devices = reader.array(raw, "vfio", VFIO_KEYS)
    disks = reader.array(raw, "disk", DISK_KEYS)
    nets = reader.array(raw, "net", NET_KEYS)
    cross_check(reader, vm, objects, devices)
    check_ids(reader, {"iommufd": objects, "vfio": devices, "disk": disks, "net": nets})
    check_vm(reader, vm)
    check_nets(reader, nets)
    if reader.problems:
        raise ConfigError(str(path), reader.problems)
    return Config(
        file=path,
        vm=Vm(**vm),
        iommufd=tuple(Iommufd(**o.values) for o in objects),
        vfio=tuple(Vfio(**d.values) for d in devices),
        disk=tuple(Disk(**d.values) for d in disks),
        net=tuple(Net(**n.values) for n in nets),
        sources=sources,
    )


# The sections `vmrun attach` takes from a fragment, with their keys and models.
ENTRY_SECTIONS: dict[str, tuple[tuple[Key, ...], type[Iommufd | Vfio | Disk | Net]]] = {
    "iommufd": (IOMMUFD_KEYS, Iommufd),
    "vfio": (VFIO_KEYS, Vfio),
    "disk": (DISK_KEYS, Disk),
    "net": (NET_KEYS, Net),
}


def parse_fragment(raw: dict[str, Any], path: pathlib.Path, running: Config, taken: Mapping[str, str]) -> Config:
    """The entries of a `vmrun attach` fragment (its TOML as read), validated as a config's
    are, and checked against the VM they go into: `taken` maps every id the VM has to what
    has it, and an iommufd may name one of the VM's objects. The result has the VM's [vm]
    and only the fragment's entries."""
    reader = Reader(Sources(str(path)))
    for name in raw:
        if name == "vm":
            reader.problem("vm", "a fragment adds devices to a running VM; [vm] is the VM's own", "drop [vm]")
        elif name not in ENTRY_SECTIONS:
            hint = did_you_mean(name, ENTRY_SECTIONS) or "a fragment holds [[iommufd]], [[vfio]], [[disk]] and [[net]]"
            reader.problem(key_part(name)[1:], "unknown section", hint)
    entries = {name: reader.array(raw, name, keys) for name, (keys, _) in ENTRY_SECTIONS.items()}
    cross_check(reader, {}, entries["iommufd"], entries["vfio"], [o.id for o in running.iommufd])
    check_ids(reader, entries, taken)
    check_nets(reader, entries["net"])
    if not reader.problems and not any(entries.values()):
        reader.problems.append(
            Problem("", "adds nothing", "list what to attach as [[vfio]], [[iommufd]], [[disk]] or [[net]] entries")
        )
    if reader.problems:
        raise ConfigError(str(path), reader.problems)
    return Config(
        file=path,
        vm=running.vm,
        iommufd=tuple(Iommufd(**o.values) for o in entries["iommufd"]),
        vfio=tuple(Vfio(**d.values) for d in entries["vfio"]),
        disk=tuple(Disk(**d.values) for d in entries["disk"]),
        net=tuple(Net(**n.values) for n in entries["net"]),
    )


def entry(section: str, raw: dict[str, Any], base: pathlib.Path) -> Iommufd | Vfio | Disk | Net:
    """An entry as a config or fragment in directory `base` wrote it (how `vmrun attach`
    records what it added), read by the same keys; ValueError when it no longer reads."""
    keys, model = ENTRY_SECTIONS[section]
    reader = Reader(Sources(str(base)), base=base)
    values = reader.table(raw, keys, section)
    if reader.problems:
        raise ValueError("; ".join(p.render() for p in reader.problems))
    return model(**values)


def toml_syntax_problem(e: tomllib.TOMLDecodeError) -> Problem:
    # tomllib puts the position in the message: "Expected '=' ... (at line 3, column 7)".
    m = re.fullmatch(r"(.*) \(at (line \d+, column \d+|end of document)\)", str(e), re.DOTALL)
    message, where = (m.group(1), m.group(2)) if m else (str(e), "")
    return Problem(where, f"TOML syntax error: {message}", "fix the TOML syntax at that position")


def cross_check(
    r: Reader,
    vm: dict[str, Any],
    object_entries: list[Entry],
    device_entries: list[Entry],
    known_objects: Sequence[str] = (),
) -> None:
    """The rules that involve more than one key. `known_objects`: iommufd objects of the
    running VM a fragment may name."""
    for key in ("initrd", "append"):
        if key in vm and "kernel" not in vm:
            r.problem(
                f"vm.{key}",
                "needs vm.kernel",
                "set kernel for direct kernel boot, or drop this key",
            )

    objects = [o.values for o in object_entries]
    devices = [d.values for d in device_entries]
    object_ids = [*known_objects, *(o["id"] for o in objects if "id" in o)]
    for i, (entry, dev) in enumerate(zip(device_entries, devices, strict=True)):
        path = f"vfio[{i}]"
        # Presence as written: a host with a bad value was reported already, not "missing".
        given = [k for k in ("host", "sysfsdev", "fd") if k in entry.raw]
        if not given:
            r.problem(path, "names no device", "set exactly one of host, sysfsdev or fd")
        elif len(given) > 1:
            r.problem(
                f"{path}.{given[1]}",
                f"conflicts with {path}.{given[0]}",
                "set exactly one of host, sysfsdev or fd",
            )
        driver = dev.get("driver", "vfio-pci")
        if "host" in dev and driver != "vfio-pci":
            r.problem(
                f"{path}.host",
                f"a PCI address needs driver vfio-pci, not {driver}",
                "name the device by sysfsdev instead",
            )
        ref = dev.get("iommufd")
        if ref is not None and ref not in object_ids:
            hint = did_you_mean(ref, object_ids) or f'declare it: [[iommufd]] id = "{ref}"'
            r.problem(f"{path}.iommufd", f"no [[iommufd]] has id {shown(ref)}", hint)
        if "fd" in dev and "iommufd" not in entry.raw:
            r.problem(
                f"{path}.fd",
                "fd passing needs the iommufd backend: QEMU refuses fd= on a legacy VFIO device",
                'add iommufd = "<id of an [[iommufd]]>", or name the device by host or sysfsdev',
            )


def id_problem(section: str, ident: str) -> tuple[str, str] | None:
    """(message, hint) when `ident` cannot be an id of a `section` entry."""
    limit = DISK_ID_MAX if section == "disk" else ID_MAX
    if len(ident) > limit:
        why = ": vmrun makes QEMU block node names (at most 31 characters) from it" if section == "disk" else ""
        return f"is {len(ident)} characters long, at most {limit}{why}", "pick a shorter id"
    if ident in RESERVED_IDS:
        return f"{shown(ident)} is the id of {RESERVED_IDS[ident]}, which vmrun adds", "pick another id"
    if HOTPLUG_PORT_RE.fullmatch(ident):
        return f"{shown(ident)} is the id of a hot-plug root port, which vmrun adds", "pick another id"
    if section == "disk" and BACKING_NODE_RE.fullmatch(ident):
        return f"{shown(ident)} ends like the names vmrun gives backing layers (ID-b1, ID-b2, ...)", "pick another id"
    return None


def check_ids(r: Reader, sections: dict[str, list[Entry]], taken: Mapping[str, str] | None = None) -> None:
    """One id namespace across objects and devices, as QEMU has; caller fds used once.
    `taken`: ids a running VM already has, and what has each."""
    seen_ids: dict[str, str] = dict(taken or {})
    fds: dict[int, str] = {}
    for section, entries in sections.items():
        for i, entry in enumerate(entries):
            path, parsed = f"{section}[{i}]", entry.values
            if "id" in parsed and (bad := id_problem(section, parsed["id"])) is not None:
                r.problem(f"{path}.id", *bad)
            elif "id" in parsed:
                if parsed["id"] in seen_ids:
                    r.problem(
                        f"{path}.id",
                        f"{shown(parsed['id'])} is already the id of {seen_ids[parsed['id']]}",
                        "objects and devices share one id namespace; pick another id",
                    )
                else:
                    seen_ids[parsed["id"]] = path
            if "fd" in parsed:
                if parsed["fd"] in fds:
                    r.problem(f"{path}.fd", f"fd {parsed['fd']} is already passed as {fds[parsed['fd']]}.fd")
                else:
                    fds[parsed["fd"]] = path


def is_q35(machine: str) -> bool:
    return machine == "q35" or machine.startswith("pc-q35")


def check_vm(r: Reader, vm: dict[str, Any]) -> None:
    if "uefi_vars" in vm and vm.get("firmware") != "uefi":
        r.problem("vm.uefi_vars", 'needs firmware = "uefi"', 'set vm.firmware = "uefi", or drop this key')
    if vm.get("viommu") == "intel" and not is_q35(vm.get("machine", "q35")):
        r.problem("vm.viommu", f"intel-iommu needs a q35 machine, not {vm['machine']}", 'set machine = "q35"')
    if vm.get("hotplug_slots") and not is_q35(vm.get("machine", "q35")):
        r.problem(
            "vm.hotplug_slots",
            f"hot-plug slots are PCIe root ports, which need a q35 machine, not {vm['machine']}",
            f"drop it: on {vm['machine']} `vmrun attach` plugs devices into the root bus",
        )
    page = HUGEPAGE_SIZES.get(vm.get("hugepages", "off"))
    memory = vm.get("memory")
    if page is not None and memory is not None and memory % page:
        # QEMU refuses a huge-page backend whose size is not a whole number of pages.
        whole = [k * page for k in (memory // page, memory // page + 1) if k]
        r.problem(
            "vm.memory",
            f"{format_size(memory)} is not a whole number of {vm['hugepages']} huge pages",
            "round it: " + " or ".join(f'"{format_size(k)}"' for k in whole) + ", or use smaller pages",
        )


def check_nets(r: Reader, nets: list[Entry]) -> None:
    for i, entry in enumerate(nets):
        kind = entry.values.get("type", "user")
        if kind == "tap" and "ifname" not in entry.raw:
            r.problem(f"net[{i}]", "a tap device needs ifname", 'name an existing tap, e.g. ifname = "tap0"')
        if kind != "tap" and "ifname" in entry.raw:
            r.problem(f"net[{i}].ifname", 'only for type = "tap"', 'drop it, or set type = "tap"')
        if kind != "user" and "forwards" in entry.raw:
            r.problem(f"net[{i}].forwards", 'only for type = "user"', "forward ports on the host's bridge instead")
