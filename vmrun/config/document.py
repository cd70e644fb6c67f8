"""A TOML document read from a config file's text: tomllib's errors become problems located
at the line and column, and documents Python itself cannot hold (nested too deep, numbers
of too many digits) are refused in the same words."""

from __future__ import annotations

import pathlib
import re
import sys
import tomllib
from typing import Any

from vmrun.base.errors import ConfigError
from vmrun.base.problems import Problem


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


def toml_syntax_problem(e: tomllib.TOMLDecodeError) -> Problem:
    # tomllib puts the position in the message: "Expected '=' ... (at line 3, column 7)".
    m = re.fullmatch(r"(.*) \(at (line \d+, column \d+|end of document)\)", str(e), re.DOTALL)
    message, where = (m.group(1), m.group(2)) if m else (str(e), "")
    return Problem(where, f"TOML syntax error: {message}", "fix the TOML syntax at that position")
