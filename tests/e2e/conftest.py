"""Session fixture for the nested e2e bed: one kernel build, one L1 boot, all scenarios.

VMRUN_E2E=skip turns an unusable bed (no QEMU, kernel build failure) into skips
instead of failures, for machines that cannot build or boot it.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e import bed

HERE = Path(__file__).resolve().parent

# Per boot: only a guard against a hang. How long the bed took is a figure, printed in the
# terminal summary and by benchmarks/bed.py, never a test: a busy machine is no failure.
# The whole bed took 400-560 s on this project's machines (Dec 2026).
BED_TIMEOUT = float(os.environ.get("VMRUN_E2E_TIMEOUT", "1500"))


_RUN: list[bed.E2ERun] = []


def pytest_configure(config: pytest.Config) -> None:
    # pyproject registers it too; this keeps the directory usable on its own.
    config.addinivalue_line("markers", "e2e: runs in the nested IOMMUFD/VFIO test bed")


def _unusable(why: str) -> None:
    if os.environ.get("VMRUN_E2E") == "skip":
        pytest.skip(f"e2e bed unusable (VMRUN_E2E=skip): {why}")
    pytest.fail(f"e2e bed unusable: {why}\n(set VMRUN_E2E=skip to skip instead)")


@pytest.fixture(scope="session")
def e2e_kernel() -> Path:
    missing = bed.qemu_available()
    if missing:
        _unusable(missing)
    try:
        return bed.kernel_path()
    except bed.BedError as e:
        _unusable(str(e))
    raise AssertionError("unreachable")


def compile_checkout() -> None:
    """Bytecode for vmrun and the bed's own modules, written here on the host.

    L1 sees the checkout read-only, and a fresh clone has no __pycache__ when
    PYTHONDONTWRITEBYTECODE is set (as in CI): every vmrun call in L1 would then compile
    vmrun from source under TCG, seconds per call.
    """
    import compileall

    checkout = HERE.parent.parent
    for directory in (checkout / "vmrun", checkout / "tests"):
        compileall.compile_dir(str(directory), quiet=1)


@pytest.fixture(scope="session")
def e2e_run(e2e_kernel: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[bed.E2ERun]:
    compile_checkout()
    results = tmp_path_factory.mktemp("e2e-results")
    result = bed.run_in_bed(
        [sys.executable, str(HERE / "inside.py")],
        timeout=BED_TIMEOUT,
        results_dir=results,
        kernel=e2e_kernel,
    )
    json_path = results / "scenarios.json"
    data = json.loads(json_path.read_text()) if json_path.exists() else None
    run = bed.E2ERun(result=result, kernel=e2e_kernel, data=data)
    _RUN.append(run)
    yield run


@pytest.fixture(scope="session")
def e2e_run_cpr(tmp_path_factory: pytest.TempPathFactory) -> Iterator[bed.E2ERun]:
    """The newer stack: L1 on Linux 7.2, L2's QEMU 10.2 (both built once, then cached), with
    the scenarios `vmrun upgrade` needs and those that must hold on any stack."""
    missing = bed.qemu_available()
    if missing:
        _unusable(missing)
    try:
        kernel = bed.kernel_path(bed.CPR_KERNEL_SOURCE)
        qemu = bed.cpr_qemu_path()
    except bed.BedError as e:
        _unusable(str(e))
        raise AssertionError("unreachable") from None
    compile_checkout()
    results = tmp_path_factory.mktemp("e2e-cpr-results")
    result = bed.run_in_bed(
        [sys.executable, str(HERE / "inside.py"), "--stack", "cpr"],
        timeout=BED_TIMEOUT,
        results_dir=results,
        kernel=kernel,
        env={"VMRUN_E2E_QEMU": str(qemu)},
    )
    json_path = results / "scenarios.json"
    data = json.loads(json_path.read_text()) if json_path.exists() else None
    run = bed.E2ERun(result=result, kernel=kernel, data=data)
    _RUN.append(run)
    yield run


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for run in _RUN:
        summary(terminalreporter, run)


def summary(tr: Any, run: bed.E2ERun) -> None:
    r = run.result
    tr.section(f"e2e bed, L1 on {run.kernel.parent.name}")
    tr.write_line(f"kernel: {run.kernel}")
    tr.write_line(
        f"L1 wall time: {r.wall_seconds:.1f}s (kernel up at init: {r.boot_seconds}s), "
        f"inside.py exit: {r.returncode}, timed out: {r.timed_out}, stalled: {r.stalled}"
    )
    for i, console in enumerate(r.stalled_boots, 1):
        tr.write_line(f"boot {i} stalled in L1's kernel and was retried; its console ended:")
        tr.write_line(console[-1500:])
    if run.data:
        for name, o in run.data["scenarios"].items():
            tr.write_line(f"  {name}: {'ok' if o['ok'] else 'FAILED'} {o['seconds']:.1f}s")
        memlock = run.data["scenarios"].get("memlock_bisect", {}).get("details", {})
        for setup, (need, auto) in memlock.get("need_vs_vmrun_auto_mib", {}).items():
            tr.write_line(f"  memlock, {setup}: need {need} MiB, vmrun auto {auto:g} MiB")
        placement_summary(tr, run.data["scenarios"].get("vmrun_numa_hugepages", {}).get("details", {}))
        for name in ("vmrun_upgrade_iommufd", "vmrun_upgrade_legacy"):
            upgraded = run.data["scenarios"].get(name, {}).get("details", {})
            if upgraded:
                tr.write_line(f"  {name}: {upgraded.get('upgrade')}")


def placement_summary(tr: Any, details: dict[str, Any]) -> None:
    """The 4 KiB vs 2 MiB start times and where guest RAM went, from vmrun_numa_hugepages."""
    medians = details.get("median_start_to_qmp_ready_s")
    if not medians:
        return
    tr.write_line(
        f"  512 MiB guest, QEMU start to QMP ready (RAM pinned): 4K pages {medians['4K']:.2f}s,"
        f" 2M pages {medians['2M']:.2f}s, ratio {details['ratio_4k_over_2m']}"
    )
    for key, runs in details.get("runs", {}).items():
        if runs:
            tr.write_line(
                f"  {key} numa_maps: {runs[0]['numa_maps'][0]}  Cpus_allowed_list={runs[0]['Cpus_allowed_list']}"
            )
