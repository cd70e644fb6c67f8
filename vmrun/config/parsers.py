"""How each key's value is parsed and checked: one parser per kind of value, each with
its JSON Schema and its way back to TOML (Traits), so parsing, `vmrun schema` and
`vmrun show` cannot drift apart.
"""

from __future__ import annotations

import ipaddress
import os
import pathlib
import re
from collections.abc import Callable
from typing import Any, TypeVar

import attrs

from vmrun.base.errors import UsageError
from vmrun.base.sizes import (
    SIZE_PATTERN,
    KiB,
    MiB,
    SizeError,
    TiB,
    format_size,
    is_size_shaped,
    parse_size,
)
from vmrun.config.model import Forward, Memlock
from vmrun.config.quoting import did_you_mean, key_part, shown, toml_type
from vmrun.config.rules import FIRST_FREE_FD, ID_HINT, ID_RE, MACHINE_RE, NAME_MAX, NAME_RE, PCI_RE, PLANNED_PROPS


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
# A root port's prefetchable window: bridge windows are whole MiB; 64 TiB passes any GPU.
reserve_size = size(MiB, "MiB", MiB, 64 * TiB)


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


def pci_addresses(values: list[str]) -> list[str]:
    """PCI addresses from a command line, normalised; UsageError naming each one that is not."""
    out, bad = [], []
    for value in values:
        try:
            out.append(pci_address(value, Context(base=pathlib.Path("."))))
        except Invalid:
            bad.append(value)
    if bad:
        raise UsageError(f"not a PCI address: {', '.join(bad)} (write DDDD:BB:DD.F or BB:DD.F)")
    return out


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
