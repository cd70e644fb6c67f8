"""A running QEMU as /proc shows it, for `vmrun import --pid`: its command line, what each
of its fds is open on, and the user it runs as. Everything here is another process's
data (its user controls it): callers treat it as text, never as instructions."""

from __future__ import annotations

import os
import re

from vmrun.host.facts import Host
from vmrun.qemu.cmdline import FdInfo


def from_pid(pid: int, host_view: Host) -> tuple[list[str], dict[int, FdInfo], str | None]:
    """A running QEMU's command line, what its fds are open on, and the user it runs as."""
    import pwd

    raw = host_view.under(f"/proc/{pid}/cmdline").read_bytes()
    argv = [a.decode(errors="surrogateescape") for a in raw.split(b"\0")[:-1]]
    fds: dict[int, FdInfo] = {}
    fd_dir = host_view.under(f"/proc/{pid}/fd")
    for entry in os.listdir(fd_dir):
        if not entry.isdigit():
            continue
        try:
            target = os.readlink(fd_dir / entry)
        except OSError:
            continue
        ifname = None
        info = host_view.read(f"/proc/{pid}/fdinfo/{entry}") or ""
        if m := re.search(r"^iff:\s*(\S+)", info, re.MULTILINE):
            ifname = m[1]
        fds[int(entry)] = FdInfo(target if target.startswith("/") else None, ifname)
    user = None
    status = host_view.read(f"/proc/{pid}/status") or ""
    if (m := re.search(r"^Uid:\s*([0-9]+)", status, re.MULTILINE)) and m[1] != "0":
        try:
            user = pwd.getpwuid(int(m[1])).pw_name
        except KeyError:
            user = None
    return argv, fds, user
