"""Memory sizes as people write them ("512M", "8G", "1.5G") and as vmrun prints them."""

from __future__ import annotations

import re
from fractions import Fraction

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
TiB = 1024 * GiB

_UNITS = {"K": KiB, "M": MiB, "G": GiB, "T": TiB}
# At most 20 digits in all: more than any real size, few enough that no arithmetic overflows.
_SIZE = re.compile(r" *([0-9]{1,20}(?:\.[0-9]{1,9})?) *([KMGT])(?:i?B)? *", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes in `text`, computed exactly (no float); raises ValueError with the accepted forms."""
    m = _SIZE.fullmatch(text)
    if not m:
        raise ValueError(f"{text!r} is not a size")
    number, unit = m.groups()
    value = Fraction(number) * _UNITS[unit.upper()]
    if value.denominator != 1:
        raise ValueError(f"{text!r} is not a whole number of bytes")
    return int(value)


def format_size(n: int) -> str:
    """The largest unit that shows `n` exactly, as QEMU and humans read it: 576M, 8G."""
    for unit in ("T", "G", "M", "K"):
        if n and n % _UNITS[unit] == 0:
            return f"{n // _UNITS[unit]}{unit}"
    return f"{n}B"


def format_mib(n: int) -> str:
    """A human figure in MiB, for derivations and error messages."""
    return f"{n / MiB:g} MiB"
