"""A problem in a config, located by key path and file, and which file set each key."""

from __future__ import annotations

import attrs


@attrs.frozen
class Problem:
    """One thing wrong with a config, located by its key path (`vfio[1].host`)."""

    path: str
    message: str
    hint: str | None = None
    file: str | None = None  # the drop-in that set the key, when not the config itself

    def render(self, file: str = "") -> str:
        where = "".join(f"{part}: " for part in (self.file or file, self.path) if part)
        return where + self.message + (f" ({self.hint})" if self.hint else "")


def key_path_parents(path: str) -> list[str]:
    """`path` and each key path above it, longest first: `vm.env."A.B"` gives itself,
    `vm.env` and `vm`; `vfio[1].host` gives itself, `vfio[1]` and `vfio`."""
    cuts = []
    quoted = escaped = False
    for i, c in enumerate(path):
        if escaped:
            escaped = False
        elif quoted and c == "\\":
            escaped = True
        elif c == '"':
            quoted = not quoted
        elif not quoted and c in ".[" and i:
            cuts.append(i)
    return [path] + [path[:i] for i in reversed(cuts)]


@attrs.frozen
class Sources:
    """Which file set each key of a config: the config itself, or one of its drop-ins.

    `written` maps the key path of every value a file wrote (a scalar, an array, an
    [[array]] entry as `vfio[1]`, each key of an inline table) to that file.
    """

    main: str
    written: tuple[tuple[str, str], ...] = ()

    def file_of(self, path: str) -> str:
        """The file a problem at `path` belongs to: the one that wrote the key or the
        nearest value above it; the config itself for anything no file wrote."""
        written = dict(self.written)
        for parent in key_path_parents(path):
            if parent in written:
                return written[parent]
        return self.main

    def dropin_of(self, path: str) -> str | None:
        """The drop-in a problem at `path` belongs to, None for the config itself."""
        file = self.file_of(path)
        return None if file == self.main else file

    def dropins(self) -> list[str]:
        """The drop-ins that wrote something that still stands, in the order they apply."""
        return [f for f in dict.fromkeys(f for _, f in self.written) if f != self.main]

    def set_by(self, path: str) -> list[str]:
        """The files that wrote the value at `path` or keys inside it; empty for a default."""
        return list(dict.fromkeys(file for key, file in self.written if path in key_path_parents(key)))
