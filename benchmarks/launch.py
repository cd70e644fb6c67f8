#!/usr/bin/env python3
"""What `vmrun run` costs on top of starting QEMU directly, as a multiple of `python3 -c pass`.

Both sides start the same QEMU with the same command line: vmrun's plan for a small VM
(a disk opened as the VM user, user networking, QMP) with `-version` appended through
`vm.args`, so QEMU parses the whole command line and exits before it creates a machine.
The direct side execs the very argv and environment `vmrun plan --json` prints; vmrun's
side is a real `vmrun run`: state directory, lock, opener, limits, privilege drop (to
`nobody` when run as root), exec. It is timed twice: as a config is launched again and
again, from the plan the last launch kept (plan_cache: the config and every host fact
compared, nothing planned), and planning (the kept plan removed before each run, so it
loads the config, reads the host, plans and keeps the plan). The runs are interleaved and
their medians compared:

    overhead = median(vmrun run) - median(QEMU directly), as a multiple of
               median(python3 -c pass) on the interpreter vmrun runs on

once in wall-clock time and once in CPU time (user + system, the helper process vmrun
forks included): on a busy machine the CPU figure is the steadier one.

Every Python starts bare (-S), so no site hook (an editable install's import finder,
setuptools' distutils shim) is counted on either side; vmrun and its dependencies are
found through PYTHONPATH, as a plain install finds them. The capability cache is warmed
first (with a fresh cache, a launch spawns no QEMU), bytecode is cached as an installed
package has it, and everything lives in one temporary directory, on tmpfs where there is
one (as a root vmrun's state directory, /run/vmrun, is).

    benchmarks/launch.py [--runs N] [--qemu PATH] [--also CHECKOUT]...

--also measures the vmrun of another checkout (say, a worktree of main) in the same
interleaved runs: on a shared machine, figures from two separate runs do not compare.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
# -S: no site hooks; -P: not the current directory first on sys.path, so each checkout's own
# vmrun is the one imported.
PYTHON = [sys.executable, "-S", "-P"]
# What the `vmrun` console script runs.
VMRUN = [*PYTHON, "-c", "import sys; from vmrun.cli import main; sys.exit(main())"]
PLANNING = "vmrun run, planning"
QUIET = [
    (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
    (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
    (os.POSIX_SPAWN_OPEN, 2, os.devnull, os.O_WRONLY, 0),
]


def write_config(d: pathlib.Path, qemu: str) -> pathlib.Path:
    disk = d / "disk.raw"
    disk.write_bytes(b"\0" * (1 << 20))
    disk.chmod(0o666)  # opened with the VM user's rights
    user = 'user = "nobody"\n' if os.geteuid() == 0 else ""
    cfg = d / "vm.toml"
    cfg.write_text(
        f"""[vm]
name = "launch-bench-{os.getpid()}"
memory = "64M"
accel = "tcg"
qemu = {json.dumps(qemu)}
{user}args = ["-version"]   # QEMU parses everything, then exits

[[disk]]
id = "root"
path = "disk.raw"

[[net]]
id = "net0"
forwards = ["tcp:2222:22"]
"""
    )
    return cfg


def check(argv: list[str], env: dict[str, str]) -> None:
    """Run once, showing why when it fails (the timed runs see no output)."""
    proc = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{argv[:4]}... failed ({proc.returncode}):\n{proc.stderr}")


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Wall-clock and CPU seconds of one run (wait4 counts the children it reaped, too)."""
    start = time.perf_counter()
    pid = os.posix_spawn(argv[0], argv, env, file_actions=QUIET)
    _, status, usage = os.wait4(pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{argv[:4]}... failed ({os.waitstatus_to_exitcode(status)})")
    return wall, usage.ru_utime + usage.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=30, help="runs of each command (default 30)")
    ap.add_argument("--qemu", default="qemu-system-x86_64", help="QEMU binary (default qemu-system-x86_64)")
    ap.add_argument("--also", action="append", default=[], metavar="CHECKOUT", help="also time this checkout's vmrun")
    args = ap.parse_args()
    qemu = shutil.which(args.qemu)
    if qemu is None:
        sys.exit(f"{args.qemu}: not found (give --qemu PATH)")

    shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    d = pathlib.Path(tempfile.mkdtemp(prefix="vmrun-bench-", dir=shm))
    try:
        d.chmod(0o755)  # the VM user reaches the disk
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        env |= {
            "VMRUN_STATE_DIR": str(d / "state"),
            "XDG_CACHE_HOME": str(d / "cache"),
            "PYTHONPYCACHEPREFIX": str(d / "pyc"),
        }
        path = {"PYTHONPATH": os.pathsep.join([str(REPO), sysconfig.get_paths()["purelib"]])}
        env |= path
        cfg = write_config(d, qemu)
        planned = subprocess.run([*VMRUN, "plan", "--json", str(cfg)], env=env, capture_output=True, text=True)
        if planned.returncode != 0 or json.loads(planned.stdout)["problems"]:
            sys.exit(f"the benchmark's config does not plan:\n{planned.stdout}{planned.stderr}")
        plan = json.loads(planned.stdout)
        commands = {
            "python3 -c pass": ([*PYTHON, "-c", "pass"], env),
            "python3 -c 'import attrs'": ([*PYTHON, "-c", "import attrs"], env),
            "QEMU directly": (plan["argv"], plan["env"]),
            "vmrun run": ([*VMRUN, "run", str(cfg)], env),
            # The same launch with no kept plan (plan_cache): it plans first, and keeps the plan.
            PLANNING: ([*VMRUN, "run", str(cfg)], env),
        }
        kept = d / "state" / ".plans"
        for other in args.also:
            tree = pathlib.Path(other).resolve()
            other_env = env | {"PYTHONPATH": path["PYTHONPATH"].replace(str(REPO), str(tree), 1)}
            commands[f"vmrun run ({tree.name})"] = ([*VMRUN, "run", str(cfg)], other_env)
        for argv, e in commands.values():  # warm: bytecode, capability cache, page cache
            check(argv, e)
        wall: dict[str, list[float]] = {name: [] for name in commands}
        cpu: dict[str, list[float]] = {name: [] for name in commands}
        names = list(commands)
        for i in range(args.runs):
            for name in names[i % len(names) :] + names[: i % len(names)]:  # rotate the order
                if name == PLANNING:
                    shutil.rmtree(kept, ignore_errors=True)
                w, c = timed(*commands[name])
                wall[name].append(w)
                cpu[name].append(c)
    finally:
        shutil.rmtree(d)

    print(f"QEMU: {qemu} with the plan's argv and -version (parses its command line, then exits)")
    print(f"python: {sys.executable} -S -P; {args.runs} runs of each, interleaved; medians:")
    print(f"  {'':<28} {'wall':>9} {'cpu':>9}")
    for name in commands:
        w, c = statistics.median(wall[name]), statistics.median(cpu[name])
        print(f"  {name:<28} {w * 1000:7.1f}ms {c * 1000:7.1f}ms")
    for label, t in (("wall-clock", wall), ("CPU", cpu)):
        m = {name: statistics.median(v) for name, v in t.items()}
        base = m["python3 -c pass"]
        attrs_cost = m["python3 -c 'import attrs'"] - base
        print(f"{label}: import attrs alone {attrs_cost / base:.1f} x python3 -c pass")
        for name in commands:
            if name.startswith("vmrun run"):  # the kept plan's, planning, --also's
                overhead = m[name] - m["QEMU directly"]
                print(f"{label}: overhead of {name} {overhead * 1000:.1f} ms = {overhead / base:.1f} x python3 -c pass")


if __name__ == "__main__":
    main()
