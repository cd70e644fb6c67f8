"""The error types vmrun reports to its users, and how each maps to an exit status."""

from __future__ import annotations

TYPE_CHECKING = False  # as in host/reader.py: typing itself costs a launch 15 ms


if TYPE_CHECKING:
    from vmrun.base.problems import Problem

EXIT_OK = 0
EXIT_FAILED = 1  # the host cannot do what the config asks, or the launch failed
EXIT_USAGE = 2  # bad input: a config error or a wrong command line


class ConfigError(Exception):
    """Every problem found in one config file; raised only after all were collected."""

    def __init__(self, file: str, problems: list[Problem]) -> None:
        super().__init__(file)
        self.file = file
        self.problems = problems

    def lines(self) -> list[str]:
        return [p.render(self.file) for p in self.problems]

    def __str__(self) -> str:
        return "\n".join(self.lines())


class Failure(Exception):
    """Something the host or a VM did not do: what failed and what to do about it."""

    def __init__(self, what: str, hint: str | None = None) -> None:
        super().__init__(what)
        self.what = what
        self.hint = hint

    def __str__(self) -> str:
        return self.what + (f"\n  hint: {self.hint}" if self.hint else "")


class LaunchError(Failure):
    """A step of the launch (or of preparing the host for it) failed."""


class VmError(Failure):
    """A VM cannot be found, reached or stopped."""


class UsageError(Exception):
    """The command line asks for something that cannot be (exit status 2)."""


class BadName(ValueError):
    """Not a VM name (the command line's fault: exit status 2)."""
