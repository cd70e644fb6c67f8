"""Golden plans: each config under tests/golden/ and, beside it, the plan text expected.

The text is the command line one option per line, the fd table, the memlock derivation
and the identity. Regenerate on purpose with VMRUN_REGEN_GOLDEN=1 and review the diff.
"""

from __future__ import annotations

import os
import pathlib

import pytest

from tests.conftest import REPO, plan_for
from vmrun.plan import render

GOLDEN = REPO / "tests" / "golden"
CASES = sorted(GOLDEN.glob("*.toml"))


def normalise(text: str) -> str:
    return text.replace(str(REPO), "@REPO@")


@pytest.mark.parametrize("config", CASES, ids=[c.stem for c in CASES])
def test_golden_plan(
    config: pathlib.Path,
    standard_host: pathlib.Path,
    numa_host: pathlib.Path,
    gpu_host: pathlib.Path,
    narrow_host: pathlib.Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("VMRUN_STATE_DIR", "/run/vmrun")
    # numa-*: fakehost.TWO_NODES, two NUMA nodes and huge pages; gpu-*: fakehost.GPU_SERVER,
    # GPUs with big BARs on a 46-bit server; narrow-*: the same devices on a 39-bit client part.
    hosts = {"numa": numa_host, "gpu": gpu_host, "narrow": narrow_host}
    host = hosts.get(config.stem.split("-", 1)[0], standard_host)
    got = normalise(render.text(plan_for(config.relative_to(REPO), host)))
    expected_file = config.with_suffix(".args")
    if os.environ.get("VMRUN_REGEN_GOLDEN") == "1":
        expected_file.write_text(got)
    assert expected_file.exists(), f"{expected_file} is missing: run with VMRUN_REGEN_GOLDEN=1 and review it"
    assert got == expected_file.read_text(), f"plan of {config.name} differs from {expected_file.name}"


def test_golden_cases_exist() -> None:
    assert len(CASES) >= 8
    orphans = [a for a in GOLDEN.glob("*.args") if not a.with_suffix(".toml").exists()]
    assert not orphans, f"golden files without a config: {orphans}"
