"""Memory sizes as people write them ("512M", "8G", "1.5G") and as vmrun prints them."""

from __future__ import annotations

import re

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
TiB = 1024 * GiB

_UNITS = {"K": KiB, "M": MiB, "G": GiB, "T": TiB}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT])(?:i?B)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes in `text`; raises ValueError with the accepted forms."""
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"{text!r} is not a size")
    number, unit = m.groups()
    value = float(number) * _UNITS[unit.upper()]
    if value != int(value):
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
