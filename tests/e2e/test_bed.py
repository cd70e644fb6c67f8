"""Outer side of the e2e bed: one test per scenario that inside.py ran in L1."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e import bed, inside
from tests.e2e.bed import E2ERun

pytestmark = pytest.mark.e2e


def test_bed_run_completed(e2e_run: E2ERun) -> None:
    r = e2e_run.result
    assert not r.timed_out, f"the bed timed out\n{r.describe()}"
    assert r.bed_error is None, f"l1-init reported a bed error\n{r.describe()}"
    # inside.py exits 1 when a scenario failed; those failures are reported per scenario.
    assert r.returncode in (0, 1), f"inside.py did not finish normally\n{r.describe()}"
    assert e2e_run.data is not None and e2e_run.data["complete"], (
        f"scenarios.json missing or incomplete\n{r.describe()}"
    )
    assert r.qemu_returncode == 0, f"L1 did not power off cleanly\n{r.describe()}"


@pytest.mark.parametrize("name", inside.scenario_names())
def test_scenario(e2e_run: E2ERun, name: str) -> None:
    try:
        outcome = e2e_run.scenario(name)
    except bed.BedError as e:
        pytest.fail(str(e))
    log = "\n".join(outcome["log"])
    assert outcome["ok"], (
        f"scenario {name} failed: {outcome['error']}\n--- scenario log ---\n{log}\n"
        f"--- inside.py stderr ---\n{e2e_run.result.stderr[-3000:]}"
    )


def test_cpr_bed_run_completed(e2e_run_cpr: E2ERun) -> None:
    test_bed_run_completed(e2e_run_cpr)


@pytest.mark.parametrize("name", inside.scenario_names("cpr"))
def test_cpr_scenario(e2e_run_cpr: E2ERun, name: str) -> None:
    """The newer stack (QEMU 10.2 in L1 on Linux 7.2): vmrun upgrade, and what holds anywhere."""
    test_scenario(e2e_run_cpr, name)


def test_stall_watchdog_kills_and_retries(e2e_kernel: Path) -> None:
    # A real stall cannot be produced on demand; the kernel's message on the console can.
    marker = bed.STALL_MARKER.decode()
    result = bed.run_in_bed(
        ["sh", "-c", f"echo 'rcu: INFO: rcu_sched {marker}/tasks:' >/dev/console; sleep 600"],
        timeout=120,
        kernel=e2e_kernel,
        stall_retries=1,
    )
    assert result.stalled, f"the watchdog missed the stall message\n{result.describe()}"
    assert len(result.stalled_boots) == 1, f"expected one retry\n{result.describe()}"
    assert marker in result.stalled_boots[0], f"first boot's console not kept\n{result.describe()}"
    assert not result.timed_out and result.returncode is None, result.describe()
    # Two boots of a few seconds each, far from the 120 s timeout.
    assert result.wall_seconds < 60, f"the watchdog reacted slowly\n{result.describe()}"
