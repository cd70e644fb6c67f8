#!/usr/bin/env python3
"""How long the nested IOMMUFD/VFIO test bed takes: L1's wall time and each scenario's.

The test suite runs the bed and asserts what each scenario proves, never how long it took
(a busy machine must not fail a correct change); its terminal summary prints the same
figures. This runs the bed on its own, all scenarios or the ones named, and prints them:

    benchmarks/bed.py [--stack base|cpr] [--only SCENARIO]... [--timeout S]

It builds (or takes from ~/.cache/vmrun) the bed's kernel as the tests do; --stack cpr runs
the newer stack (L1 on Linux 7.2, QEMU 10.2 in it, built and cached the same way) with its
scenarios, `vmrun upgrade` among them. Run as root, from the checkout, after scripts/install.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile
import time

CHECKOUT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(CHECKOUT))

from tests.e2e import bed, inside  # noqa: E402
from tests.e2e.conftest import compile_checkout  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stack", choices=("base", "cpr"), default="base")
    parser.add_argument(
        "--only", action="append", default=[], choices=[s.name for s in inside.SCENARIOS], metavar="SCENARIO"
    )
    parser.add_argument("--timeout", type=float, default=1500.0, help="seconds before the bed counts as hung")
    args = parser.parse_args()
    kernel = bed.kernel_path(bed.CPR_KERNEL_SOURCE if args.stack == "cpr" else None)
    env = {"VMRUN_E2E_QEMU": str(bed.cpr_qemu_path())} if args.stack == "cpr" else {}
    compile_checkout()
    results = pathlib.Path(tempfile.mkdtemp(prefix="vmrun-bed-"))
    only = [arg for name in args.only for arg in ("--only", name)]
    start = time.monotonic()
    result = bed.run_in_bed(
        [sys.executable, str(CHECKOUT / "tests" / "e2e" / "inside.py"), "--stack", args.stack, *only],
        timeout=args.timeout,
        results_dir=results,
        kernel=kernel,
        env=env,
    )
    wall = time.monotonic() - start
    data_file = results / "scenarios.json"
    if not data_file.exists():
        print(result.describe(), file=sys.stderr)
        return 1
    data = json.loads(data_file.read_text())
    print(f"L1 wall time {result.wall_seconds:.1f} s (this run {wall:.1f} s); results in {results}")
    failed = 0
    for name, outcome in data["scenarios"].items():
        failed += not outcome["ok"]
        print(f"  {name:40} {'ok' if outcome['ok'] else 'FAILED':6} {outcome['seconds']:6.1f} s")
        if not outcome["ok"]:
            print("    " + outcome["error"].replace("\n", "\n    ")[:3000])
    return 1 if failed or result.returncode != 0 else 0


if __name__ == "__main__":
    sys.exit(main())
