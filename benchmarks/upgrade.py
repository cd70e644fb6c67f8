#!/usr/bin/env python3
"""How long `vmrun upgrade` pauses a running guest, and how long it takes in all.

Boots the demo guest in count mode (it prints a counter kept in its RAM five times a
second) as `nobody` under TCG, upgrades it --runs times to --qemu (default: the binary it
runs), and prints for each upgrade what vmrun reported (the pause: from the old QEMU's STOP
event to the hand-over completing, with QEMU's return path on, i.e. the new QEMU running the
guest; the total: the whole command), the command's wall time, and whether the guest went
on with the same boot, the same RAM and a counter that never started over. Then the medians.

    benchmarks/upgrade.py [--runs N] [--qemu PATH] [--memory SIZE]

Run as root (QEMU runs as nobody), after scripts/install (the demo guest).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
DONE_RE = re.compile(r"in ([0-9.]+) s; the guest paused ([0-9]+) ms")
COUNT_RE = re.compile(r"vmrun-demo: count (\d+) boot (\S+) ram (\S+)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--qemu", help="the QEMU to upgrade to (default: the one the VM runs)")
    parser.add_argument("--memory", default="512M")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("upgrade.py: run as root (QEMU runs as nobody)", file=sys.stderr)
        return 2
    demo = REPO / "build" / "demo"
    work = pathlib.Path(tempfile.mkdtemp(prefix="vmrun-upgrade-bench-"))
    work.chmod(0o755)
    env = {**os.environ, "VMRUN_STATE_DIR": str(work / "state")}
    (work / "state").mkdir(mode=0o755)
    cfg = work / "bench.toml"
    cfg.write_text(
        f'[vm]\nname = "bench"\nmemory = "{args.memory}"\naccel = "tcg"\nuser = "nobody"\nmemlock = "off"\n'
        f'console = "stdio"\nkernel = "{demo / "vmlinuz"}"\ninitrd = "{demo / "initrd"}"\n'
        'append = "console=ttyS0 quiet panic=-1 vmrun-demo=count"\n'
    )
    vmrun = [sys.executable, "-m", "vmrun.cli"]
    proc = subprocess.Popen([*vmrun, "run", str(cfg)], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(line.rstrip() for line in proc.stdout or ()), daemon=True).start()

    def counts() -> list[tuple[int, str, str]]:
        return [(int(m[1]), m[2], m[3]) for line in list(lines) if (m := COUNT_RE.search(line))]

    def wait_count(n: int) -> None:
        deadline = time.monotonic() + 120
        while not (counts() and counts()[-1][0] >= n):
            if time.monotonic() > deadline:
                raise SystemExit("upgrade.py: the guest stopped counting:\n" + "\n".join(lines[-10:]))
            time.sleep(0.05)

    pauses, totals, walls = [], [], []
    try:
        wait_count(3)
        print(f"{'run':>3}  {'pause ms':>8}  {'vmrun s':>7}  {'wall s':>6}  guest")
        for run in range(1, args.runs + 1):
            before = counts()[-1][0]
            start = time.monotonic()
            extra = ["--qemu", args.qemu] if args.qemu else []
            done = subprocess.run(
                [*vmrun, "upgrade", "bench", *extra], cwd=REPO, env=env, capture_output=True, text=True
            )
            wall = time.monotonic() - start
            m = DONE_RE.search(done.stdout)
            if done.returncode != 0 or m is None:
                print(f"upgrade.py: run {run} failed: {done.stderr.strip()}", file=sys.stderr)
                return 1
            wait_count(before + 5)
            seen = counts()
            numbers = [n for n, _, _ in seen]
            same = len({(b, r) for _, b, r in seen}) == 1 and numbers == list(range(numbers[0], numbers[-1] + 1))
            pauses.append(int(m[2]))
            totals.append(float(m[1]))
            walls.append(wall)
            print(f"{run:>3}  {m[2]:>8}  {m[1]:>7}  {wall:6.2f}  {'same boot, RAM and count' if same else 'CHANGED'}")
        print(
            f"median: pause {statistics.median(pauses):g} ms, vmrun {statistics.median(totals):g} s,"
            f" wall {statistics.median(walls):.2f} s ({args.runs} upgrades, {args.memory} guest, TCG)"
        )
    finally:
        subprocess.run([*vmrun, "stop", "bench", "--timeout", "5"], cwd=REPO, env=env, capture_output=True)
        proc.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
