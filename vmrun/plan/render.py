"""A plan as people and programs read it: shell text, one option per line, or JSON."""

from __future__ import annotations

import json
import shlex
from typing import Any

from vmrun.base.problems import Problem
from vmrun.base.sizes import UNLIMITED
from vmrun.plan import address_space
from vmrun.plan.address_space import AddressSpace
from vmrun.plan.placement import describe_affinity
from vmrun.plan.planner import Plan


def note(plan: Plan, problem: Problem) -> str:
    """A note as `vmrun check` shows it: named by the drop-in that set its key, when a drop-in did
    (the config itself heads the plan)."""
    file = plan.file_of(problem.path)
    return problem.render(file if file != plan.config else "")


def shell_lines(plan: Plan) -> list[str]:
    """The command line, one option per line, ready to paste into a shell.

    The planned fds become `N<>PATH` redirections so the pasted command gets them too.
    """
    lines = [" ".join(shlex.quote(a) for a in opt) for opt in plan.options]
    redirects = [
        f"{f.fd}<>{shlex.quote(f.path)}" for f in plan.fds if f.kind == "device" and f.path and f.path[0] == "/"
    ]
    if redirects:
        lines.append(" ".join(redirects))
    lines = lines[:1] + ["  " + line for line in lines[1:]]
    return [line + " \\" for line in lines[:-1]] + lines[-1:]


def fd_table(plan: Plan) -> list[str]:
    # A fixed path column: a width taken from the paths would make the text depend on
    # where a config lives, and golden files must not.
    flags_width = max([len(f.flags) for f in plan.fds] + [0])
    rows = []
    user = plan.run_as.name if plan.run_as else "the caller"
    for f in plan.fds:
        extra = " [per-process accounting]" if f.per_process_accounting else ""
        if f.kind == "file":
            extra += f" [opened as {user}]" if f.as_user else " [trusted: opened by vmrun]"
        rows.append(f"{f.fd:>3}  {f.path or '(inherited)':<30}  {f.flags:<{flags_width}}  {f.purpose}{extra}")
    return rows


def text(plan: Plan, show_problems: bool = True) -> str:
    out = [f"# vmrun plan for {plan.name} ({plan.config})"]
    if plan.memlock.limit is not None:
        limit = "unlimited" if plan.memlock.limit == UNLIMITED else str(plan.memlock.limit // 1024)
        out.append(f"ulimit -l {limit}")
    out += shell_lines(plan)
    out.append("# fds:")
    out += [f"#   {row}" for row in fd_table(plan)] or ["#   (none beyond stdin, stdout, stderr)"]
    out.append(f"# state: {plan.state_dir} (vmrun creates the lock and the QMP socket; QEMU inherits them)")
    out.append(f"# memlock: {plan.memlock.describe()}")
    if plan.run_as is None:
        out.append("# run as: the caller")
    else:
        u = plan.run_as
        out.append(f"# run as: {u.name} (uid {u.uid}, gid {u.gid}, groups {','.join(map(str, u.groups))})")
    out.append("# env: " + " ".join(shlex.quote(f"{k}={v}") for k, v in plan.env))
    if plan.cpu_affinity is not None:
        out.append(f"# cpu affinity: {describe_affinity(plan.cpu_affinity, plan.numa_node)} (set by vmrun before exec)")
    if plan.address_space is not None:
        out += [f"# address space: {line}" for line in address_space.describe(plan.address_space)]
    out += [f"# note: {note(plan, n)}" for n in plan.notes]
    if show_problems:
        out += [f"# problem: {p.render(plan.file_of(p.path))}" for p in plan.problems]
    return "\n".join(out) + "\n"


def to_json(plan: Plan) -> dict[str, Any]:
    limit = plan.memlock.limit
    return {
        "name": plan.name,
        "config": plan.config,
        "argv": plan.argv,
        "state_dir": plan.state_dir,
        "fds": [
            {
                "fd": f.fd,
                "path": f.path,
                "flags": f.flags,
                "purpose": f.purpose,
                "per_process_accounting": f.per_process_accounting,
                "kind": f.kind,
                "as_user": f.as_user,
            }
            for f in plan.fds
        ],
        "memlock_bytes": None if limit is None or limit == UNLIMITED else limit,
        "memlock": {
            "limit": "unlimited" if limit == UNLIMITED else limit,
            "derivation": plan.memlock.derivation,
        },
        "run_as": None
        if plan.run_as is None
        else {
            "user": plan.run_as.name,
            "uid": plan.run_as.uid,
            "gid": plan.run_as.gid,
            "groups": list(plan.run_as.groups),
        },
        "env": dict(plan.env),
        "cpu_affinity": None if plan.cpu_affinity is None else list(plan.cpu_affinity),
        "numa_node": plan.numa_node,
        "address_space": None if plan.address_space is None else space_json(plan.address_space),
        "notes": [note(plan, n) for n in plan.notes],
        "problems": [p.render(plan.file_of(p.path)) for p in plan.problems],
    }


def space_json(space: AddressSpace) -> dict[str, Any]:
    return {
        "bars": [
            {"device": d.device, "bar": b.index, "size": b.size, "is64": b.is64, "prefetch": b.prefetch}
            for d in space.devices
            for b in d.bars
        ],
        "bars_64_bytes": space.bars_64,
        "hotplug_reserved_bytes": space.reservations,
        "window_bytes": space.aperture or None,
        "phys_bits": space.phys_bits,
        "phys_bits_set": space.set_phys_bits,
        "ram_top": space.ram_top,
        "p2p": space.p2p,
    }


def json_text(plan: Plan) -> str:
    return json.dumps(to_json(plan), indent=2) + "\n"
