"""`vmrun run`: launch the plan the last launch kept when nothing it came from changed (then
no config model, planner or attrs is loaded: benchmarks/launch.py), else plan and launch.

The launch itself (launcher.launch) execs QEMU and does not return.
"""

from __future__ import annotations

import sys

from vmrun.base.errors import EXIT_FAILED, EXIT_OK
from vmrun.launch import fd_open, plan_cache
from vmrun.launch.launcher import ensure_stdio, launch


def run(file: str, host_root: str, paused: bool, dry_run: bool) -> int:
    ensure_stdio()  # first: the opener's socket must not take the number of a closed stdio fd
    passed = fd_open.open_fds()  # the caller's fds, before vmrun opens any of its own
    key = None if dry_run else plan_cache.key_before_planning(file, host_root)
    if key is not None:
        kept = plan_cache.load(file, host_root, key)
        if kept is not None:
            p, opener = kept
            if paused:
                p.argv.append("-S")
            sys.stdout.flush()
            launch(p, opener=opener, passed=passed)
    return plan_and_run(file, host_root, paused, dry_run, passed, key)


def plan_and_run(
    file: str, host_root: str, paused: bool, dry_run: bool, passed: frozenset[int], key: dict[str, object] | None
) -> int:
    """Plan the launch (keeping the plan under `key` for the next one), then launch it; with
    `dry_run`, print it instead."""
    import attrs

    from vmrun.config import loader
    from vmrun.host import facts, reader
    from vmrun.kernel.opener import Opener
    from vmrun.plan.planner import plan

    config = loader.load(file)
    # One helper opens files as the VM user for the plan's facts and for the launch: one fork, not two.
    with Opener(facts.lookup_user(config.vm.user) if config.vm.user else None) as opener:
        record, host = facts.gather_record(config, host_root, opener=opener)
        p = plan(config, host)
        if key is not None:
            plan_cache.store(key, file, host_root, reader.query(config), record, p)
        if paused:
            # Last, after vm.args: QEMU creates the whole machine, the CPUs wait for QMP `cont`.
            p = attrs.evolve(p, options=(*p.options, ("-S",)))
        if dry_run:
            from vmrun.plan import render

            sys.stdout.write(render.text(p))
            return EXIT_FAILED if p.problems else EXIT_OK
        sys.stdout.flush()
        launch(p, opener=opener, passed=passed)
