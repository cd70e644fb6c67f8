"""Building QEMU option strings that no config value can break out of.

QEMU splits `-device`/`-object` values at commas and takes `,,` as a literal comma, so
every value is escaped; keys and driver names are validated by the config instead.
"""

from __future__ import annotations

from collections.abc import Iterable

from vmrun.config.model import PropValue


def escape(value: str) -> str:
    return value.replace(",", ",,")


def prop_value(value: PropValue) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return escape(str(value))


def option(driver: str, props: Iterable[tuple[str, PropValue | None]]) -> str:
    """`driver,key=value,...`, skipping properties whose value is None."""
    parts = [driver] + [f"{k}={prop_value(v)}" for k, v in props if v is not None]
    return ",".join(parts)


def keyval(props: Iterable[tuple[str, PropValue | None]]) -> str:
    """`key=value,...` for options without a leading type, such as -blockdev."""
    return ",".join(f"{k}={prop_value(v)}" for k, v in props if v is not None)


def group(args: Iterable[str]) -> list[tuple[str, ...]]:
    """Raw arguments as options with their values, one group per option, for printing."""
    groups: list[tuple[str, ...]] = []
    for arg in args:
        if arg.startswith("-") or not groups:
            groups.append((arg,))
        else:
            groups[-1] = (*groups[-1], arg)
    return groups
