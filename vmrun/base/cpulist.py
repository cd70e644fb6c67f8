"""CPU lists in the kernel's format ("0-3,8,10-11"), as sysfs and /proc write them."""

from __future__ import annotations


def parse_cpulist(text: str) -> tuple[int, ...]:
    """CPU numbers from the kernel's list format; raises ValueError."""
    cpus: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        first, _, last = part.partition("-")
        cpus += range(int(first), int(last or first) + 1)
    return tuple(sorted(set(cpus)))


def format_cpulist(cpus: tuple[int, ...] | list[int] | frozenset[int] | set[int]) -> str:
    """The kernel's compact list format, runs joined: 0-3,8."""
    runs: list[list[int]] = []
    for cpu in sorted(cpus):
        if runs and cpu == runs[-1][-1] + 1:
            runs[-1].append(cpu)
        else:
            runs.append([cpu])
    return ",".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)
