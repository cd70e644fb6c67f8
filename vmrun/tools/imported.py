"""What `vmrun import` made, and its TOML text: the config with a comment on every option
or element that was dropped or kept raw, and why."""

from __future__ import annotations

import re
from typing import Any

import attrs

from vmrun.base.text import printable
from vmrun.tools import show

# An argument shown bare in a comment: printable ASCII with nothing TOML or a reader could
# take for the comment's end or for another argument.
PLAIN_TOKEN_RE = re.compile(r"[!$-~]+")


def shown(tokens: tuple[str, ...] | list[str]) -> str:
    """Arguments as a comment or an error shows them: plain ones bare, the rest as TOML strings."""
    return " ".join(t if PLAIN_TOKEN_RE.fullmatch(t) else show.value_text(t) for t in tokens)


@attrs.frozen
class Imported:
    doc: dict[str, Any]
    args: tuple[tuple[str, tuple[str, ...]], ...]  # the options kept in vm.args, each with why
    dropped: tuple[tuple[str, tuple[str, ...]], ...] = ()  # the options left out, each with why
    # The option or element each key path came from (`vm.memory`: `-m 8G`), for errors that
    # name what was read rather than the file that was written.
    origins: tuple[tuple[str, str], ...] = ()

    def text(self, source: str) -> str:
        vm = {k: v for k, v in self.doc["vm"].items() if k != "args"}
        body = show.config_text({**self.doc, "vm": vm})
        lines = [f"# Imported by `vmrun import` from {source}.", ""]
        head, _, tail = body.partition("\n\n")
        for why, tokens in self.dropped:
            # Out of the config: vmrun supplies its own (or has none), as each line says.
            if tokens:
                text = f"dropped {shown(tokens)}: {why}"
            else:
                text = why if why.startswith("note: ") else f"dropped {why}"
            lines.append(f"# {printable(text)}")
        if self.dropped:
            lines.append("")
        lines.append(head.rstrip("\n"))
        if self.args:
            lines.append("args = [")
            for why, tokens in self.args:
                # A comment ends at a newline: the argv is data (a process's /proc), so the
                # comment shows it as TOML strings where it is not plain, and escapes the rest.
                lines.append(f"    # {printable(f'{shown(tokens)}: {why}')}")
                lines.append("    " + ", ".join(show.value_text(t) for t in tokens) + ",")
            lines.append("]")
        return "\n".join(lines) + ("\n\n" + tail if tail else "\n")
