"""What QEMU creates for one config entry, typed, so one description serves the command
line of a launch and the QMP commands of `vmrun attach` alike.

A piece names the fds it needs by the plan's fd numbers; on the command line that is the
number QEMU inherits, over QMP it is the name given with `getfd` or the set made by
`add-fd`, which QEMU looks up the same way (`monitor_fd_param`, `/dev/fdset/N`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import attrs

from vmrun.config.model import PropValue
from vmrun.qemu import args as qemu_args

PieceKind = Literal["add-fd", "object", "blockdev", "netdev", "device"]
Props = tuple[tuple[str, PropValue | None], ...]
FDSET_PREFIX = "/dev/fdset/"


@attrs.frozen
class Piece:
    kind: PieceKind
    type: str  # the QOM type, netdev type or device driver; "" for blockdev and add-fd
    props: Props  # in command-line order; a None value is left out
    fd: int | None = None  # the planned fd this piece takes: add-fd's fd, or the "fd" property

    def option(self) -> tuple[str, str]:
        if self.kind == "add-fd":
            return ("-add-fd", qemu_args.keyval(self.props))
        if self.kind == "blockdev":
            return ("-blockdev", qemu_args.keyval(self.props))
        return (f"-{self.kind}", qemu_args.option(self.type, self.props))

    @property
    def fdset(self) -> int:
        """add-fd: the number of the fd set in the plan (QEMU's may differ over QMP)."""
        value = dict(self.props)["set"]
        assert isinstance(value, int), self
        return value

    @property
    def id(self) -> str:
        """The id QEMU knows this piece by (a block node's node-name)."""
        for key, value in self.props:
            if key in ("id", "node-name"):
                return str(value)
        return ""

    def qmp(self, fd_names: Mapping[int, str], fdsets: Mapping[int, int]) -> tuple[str, dict[str, Any]]:
        """The QMP command that creates this piece in a running QEMU.

        `fd_names` maps planned fd numbers to the names they were given with getfd;
        `fdsets` maps the plan's fd set numbers to the ones add-fd returned.
        """
        args: dict[str, Any] = {}
        for key, value in self.props:
            if value is None:
                continue
            if key == "fd" and self.kind != "add-fd":
                value = fd_names[int(value)]
            if isinstance(value, str) and value.startswith(FDSET_PREFIX):
                value = f"{FDSET_PREFIX}{fdsets[int(value.removeprefix(FDSET_PREFIX))]}"
            if key == "hostfwd":
                # Repeated on the command line, a list of {"str": ...} in QAPI.
                args.setdefault(key, []).append({"str": value})
                continue
            target = args
            *parents, leaf = key.split(".")  # cache.direct -> {"cache": {"direct": ...}}
            for parent in parents:
                target = target.setdefault(parent, {})
            target[leaf] = value
        if self.kind == "object":
            return "object-add", {"qom-type": self.type, **args}
        if self.kind == "netdev":
            return "netdev_add", {"type": self.type, **args}
        if self.kind == "device":
            return "device_add", {"driver": self.type, **args}
        if self.kind == "blockdev":
            return "blockdev-add", args
        return "add-fd", {k: v for k, v in args.items() if k == "opaque"}

    def undo(self, fdset: int | None = None) -> tuple[str, dict[str, Any]]:
        """The QMP command that removes what `qmp` created."""
        if self.kind == "object":
            return "object-del", {"id": self.id}
        if self.kind == "netdev":
            return "netdev_del", {"id": self.id}
        if self.kind == "device":
            return "device_del", {"id": self.id}
        if self.kind == "blockdev":
            return "blockdev-del", {"node-name": self.id}
        return "remove-fd", {"fdset-id": fdset}


@attrs.frozen
class Part:
    """One config entry in QEMU: the pieces made for it, in the order QEMU needs them."""

    section: str  # iommufd | vfio | disk | net
    index: int  # in the config's section
    id: str
    pieces: tuple[Piece, ...]

    @property
    def device(self) -> Piece | None:
        """The guest-visible device, if the entry has one (an iommufd object has none)."""
        devices = [p for p in self.pieces if p.kind == "device"]
        return devices[-1] if devices else None
