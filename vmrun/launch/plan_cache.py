"""The plan of a launch, kept for the next launch of the same config on an unchanged host.

Planning needs the typed model (attrs, and the typing and inspect modules attrs brings),
the TOML parser and pathlib: about two thirds of what `vmrun run` costs on top of QEMU. A
VM is launched again and again from a config that has not changed, on a host that has not
changed, so `vmrun run` keeps each launch's plan and, the next time, launches that plan
without planning, once it has proven that nothing the plan came from has changed:

- the key: vmrun's own code, the working directory, the config's path as given and the
  host root, vmrun's user and groups, and the config and its drop-ins as the loader reads
  them (config_files, under the trust rule), each file compared byte for byte and by stat
  (owner, mode, inode, times);
- the host: every fact the plan was made from, read again by host/reader.py (the one reader
  of the host that planning uses too) and compared whole. This includes devices, drivers,
  IOMMU groups, cdevs, device nodes, users and groups, images and their backing chains
  opened again as the VM user, QEMU's binary, limits, CPUs, NUMA nodes, huge pages and
  the environment the plan reads.

Any difference, and any doubt (a file vmrun cannot read, a directory that is not its own),
means planning from scratch, as without a cache. Whatever the plan says, the launch still
opens every file with the rights it plans (the VM user's) and checks caller fds.

Entries live in `<state base>/.plans/` (a VM name cannot start with a dot), made and read
only through statedir: owned by vmrun's user, private, no symlinks followed, no file with
a second name. /run/vmrun is a tmpfs, so a boot starts without entries. Removing the
directory is always safe.
"""

from __future__ import annotations

import json
import os
import types
import zlib

from vmrun import __version__
from vmrun.base import layout
from vmrun.config import files as config_files
from vmrun.host import reader
from vmrun.kernel import statedir
from vmrun.kernel.opener import Opener, OpenerError

TYPE_CHECKING = False  # as in host/reader.py: typing itself costs a launch 15 ms

if TYPE_CHECKING:
    from typing import Any

    from vmrun.plan.planner import Plan

FORMAT = 1


def code() -> list[Any]:
    """vmrun's version and every module of it, in every stage package, by size and mtime: a
    changed vmrun plans anew."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # vmrun/, above launch/
    modules = []
    for directory, subdirs, names in os.walk(package):
        subdirs[:] = sorted(d for d in subdirs if d != "__pycache__")
        for name in names:
            if name.endswith(".py"):
                st = os.stat(os.path.join(directory, name))
                modules.append([os.path.relpath(os.path.join(directory, name), package), st.st_size, st.st_mtime_ns])
    return [__version__, package, sorted(modules)]


def key(file: str, host_root: str) -> dict[str, Any]:
    """Everything a plan depends on that is not a host fact: see the module's docstring."""
    return {
        "format": FORMAT,
        "code": code(),
        "cwd": os.getcwd(),
        "file": file,
        "host_root": host_root,
        "ids": [os.geteuid(), os.getegid(), sorted(os.getgroups())],
        # Read as the loader reads them, under the same trust rule: a file it would refuse
        # is recorded as refused, never read.
        "files": config_files.snapshot(file),
    }


def key_before_planning(file: str, host_root: str) -> dict[str, Any] | None:
    """The key as `vmrun run` starts, for `load` and `store`; None when it cannot be taken (a
    working directory that was removed, a vmrun whose code its user cannot list): then no
    plan is used or kept."""
    try:
        return key(file, host_root)
    except OSError:
        return None


def entry_name(file: str, host_root: str) -> str:
    where = json.dumps([os.getcwd(), file, host_root])
    return f"{zlib.crc32(where.encode()):08x}{zlib.adler32(where.encode()):08x}.json"


def canonical(value: Any) -> str:
    """One spelling for equal values, fresh or read back: JSON's (string keys, lists) first."""
    return json.dumps(json.loads(json.dumps(value)), sort_keys=True, separators=(",", ":"))


def open_directory(create: bool) -> tuple[int, str] | None:
    """The cache directory's fd and path, checked as statedir checks a VM's directory."""
    base = reader.state_base(os.geteuid())
    if base is None:
        return None
    base_fd = statedir.open_dir(base, create=create, mode=0o755 if os.geteuid() == 0 else 0o700)
    try:
        return statedir.open_subdir(base_fd, base, layout.PLANS, create=create), os.path.join(base, layout.PLANS)
    finally:
        os.close(base_fd)


def load(file: str, host_root: str, now: dict[str, Any]) -> tuple[Any, Opener] | None:
    """The kept plan for `file` if it was kept under the key `now`, as plain values the launch
    reads like a Plan, with the opener that re-read the host as its VM user (the launch opens
    with it); None to plan anew."""
    opener = None
    try:
        where = open_directory(create=False)
        if where is None:
            return None
        fd, path = where
        try:
            data = statedir.read_file(fd, path, entry_name(file, host_root))
        finally:
            os.close(fd)
        if data is None:
            return None
        entry = json.loads(data)
        if canonical(entry["key"]) != canonical(now):
            return None
        plan = json.loads(json.dumps(entry["plan"]), object_hook=lambda d: types.SimpleNamespace(**d))
        opener = Opener(plan.run_as)
        with Opener(None) as as_vmrun:
            record = reader.read(entry["query"], host_root, opener, as_vmrun)
        if canonical(record) != canonical(entry["facts"]):
            opener.close()
            return None
        return plan, opener
    except (OSError, OpenerError, statedir.UnsafeDirectory, ValueError, KeyError, TypeError, AttributeError):
        if opener is not None:
            opener.close()
        return None


def store(before: dict[str, Any], file: str, host_root: str, query: Any, facts: Any, plan: Plan) -> None:
    """Keep `plan` for the next launch: `before` is the key taken before the config was read;
    a config that changed while it was planned is not kept. Never fails a launch."""
    if plan.problems:
        return
    try:
        if canonical(key(file, host_root)) != canonical(before):
            return
        entry = {"key": before, "query": query, "facts": facts, "plan": plan.launch_record()}
        where = open_directory(create=True)
        if where is None:
            return
        fd, _ = where
        try:
            statedir.write_file(fd, entry_name(file, host_root), json.dumps(entry).encode(), mode=0o600)
        finally:
            os.close(fd)
    except (OSError, statedir.UnsafeDirectory, ValueError, TypeError):
        pass  # the launch reports a state directory it cannot use; a cache is only a cache
