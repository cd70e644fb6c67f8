"""Memory sizes as people write them ("512M", "8G", "1.5G") and as vmrun prints them."""

from __future__ import annotations

import re
import resource

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
TiB = 1024 * GiB
# The huge page sizes a VM may ask for (vm.hugepages), as x86_64 offers them.
HUGEPAGE_SIZES = {"2M": 2 * MiB, "1G": GiB}

_UNITS = {"K": KiB, "M": MiB, "G": GiB, "T": TiB}
# ASCII only: under IGNORECASE alone, [KMGT] also matches the Kelvin sign (U+212A) and
# [iI] a dotted capital I, which are not units.
_SIZE = re.compile(r" *([0-9]+(?:\.[0-9]+)?) *([KMGT])(?:i?B)? *", re.IGNORECASE | re.ASCII)
# The same shape for JSON Schema (ECMA-262 has no IGNORECASE flag in a pattern).
SIZE_PATTERN = "^ *[0-9]+(\\.[0-9]+)? *[KMGTkmgt]([iI]?[bB])? *$"
# More digits than any real size (16T is 14 digits in bytes), few enough that the exact
# arithmetic below stays cheap whatever a config says.
MAX_DIGITS = 24


class SizeError(ValueError):
    """Why `text` is not a size; `reason` reads after the text: '"8 gigs" is not a size'."""

    def __init__(self, text: str, reason: str) -> None:
        super().__init__(f"{text!r} {reason}")
        self.text = text
        self.reason = reason


def is_size_shaped(text: str) -> bool:
    """Whether `text` is written as a size (a number and a unit), whatever its value."""
    return _SIZE.fullmatch(text) is not None


def parse_size(text: str) -> int:
    """Bytes in `text`, computed exactly (no float); raises SizeError (a ValueError)."""
    m = _SIZE.fullmatch(text)
    if not m:
        raise SizeError(text, "is not a size")
    number, unit = m.groups()
    digits = len(number) - ("." in number)
    if digits > MAX_DIGITS:
        raise SizeError(text, f"has {digits} digits, at most {MAX_DIGITS}")
    # "1.5G" is 15 * GiB / 10: integers alone keep it exact.
    whole, _, fraction = number.partition(".")
    scale: int = 10 ** len(fraction)
    value, rest = divmod(int(whole + fraction) * _UNITS[unit.upper()], scale)
    if rest:
        raise SizeError(text, "is not a whole number of bytes")
    return value


def format_size(n: int) -> str:
    """The largest unit that shows `n` exactly, as QEMU and humans read it: 576M, 8G."""
    for unit in ("T", "G", "M", "K"):
        if n and n % _UNITS[unit] == 0:
            return f"{n // _UNITS[unit]}{unit}"
    return f"{n}B"


def format_mib(n: int) -> str:
    """A human figure in MiB, for derivations and error messages."""
    return f"{n / MiB:g} MiB"


# A resource limit that is no limit (RLIMIT_MEMLOCK "unlimited").
UNLIMITED = resource.RLIM_INFINITY


def format_limit(limit: int) -> str:
    """A memlock limit as people read it: whole MiB, or "unlimited"."""
    return "unlimited" if limit == UNLIMITED else format_mib(limit)
