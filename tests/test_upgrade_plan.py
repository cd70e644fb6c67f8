"""The pure parts of `vmrun upgrade`: which command line the new QEMU gets, and what is
refused before anything is touched (tests/test_upgrade.py runs it on real QEMU)."""

from __future__ import annotations

import attrs

from tests.conftest import FAKE_CAPS
from vmrun.control import upgrade

RUNNING = ["qemu-system-x86_64", "-machine", "q35,memory-backend=guest-ram,aux-ram-share=on", "-m", "1G"]


def test_the_machine_type_is_pinned_to_the_one_that_runs() -> None:
    assert upgrade.machine_type("pc-q35-10.0-machine") == "pc-q35-10.0"
    pinned = upgrade.pinned_argv(RUNNING, "pc-q35-10.0")
    assert pinned[2] == "pc-q35-10.0,memory-backend=guest-ram,aux-ram-share=on"
    keyed = upgrade.pinned_argv(["q", "-M", "type=q35,accel=tcg"], "pc-q35-10.0")
    assert keyed[2] == "type=pc-q35-10.0,accel=tcg"


def test_an_upgraded_command_line_still_compares_with_its_plan() -> None:
    """What an upgrade added (the pinned type, the -incoming channels) is not a change of config."""
    upgraded = [*upgrade.pinned_argv(RUNNING, "pc-q35-10.0"), "-incoming", "{}", "-incoming", "{}"]
    assert upgrade.comparable(upgraded) == upgrade.comparable(RUNNING)
    changed = [*RUNNING[:-1], "2G"]
    assert upgrade.comparable(changed) != upgrade.comparable(RUNNING)


@attrs.frozen
class FakePlan:
    argv: list[str]
    passthrough: tuple[object, ...] = ()


def test_refusals_name_each_reason() -> None:
    cpr = attrs.evolve(FAKE_CAPS, has_cpr_transfer=True)
    newer = attrs.evolve(cpr, version=(10, 2, 2))
    ok = FakePlan(RUNNING)
    assert upgrade.refusals(ok, cpr, cpr, "q") == []  # type: ignore[arg-type]
    private = FakePlan(["q", "-machine", "q35", "-netdev", "user,id=n,hostfwd=tcp::2222-:22"])
    why = upgrade.refusals(private, FAKE_CAPS, None, "/opt/q")  # type: ignore[arg-type]
    assert any("not shared memory" in w for w in why)
    assert any("running QEMU (10.0.2) has no CPR transfer" in w for w in why)
    assert any("new QEMU binary (/opt/q) cannot be run" in w for w in why)
    assert any("forwards host ports" in w for w in why)
    devices = FakePlan(RUNNING, passthrough=(object(),))
    why = upgrade.refusals(devices, cpr, newer, "q")  # type: ignore[arg-type]
    assert why == ["the running QEMU (10.0.2) cannot hand VFIO devices over: 10.1 or later is needed"]


def test_no_hand_over_back_across_the_10_1_handshake() -> None:
    cpr = attrs.evolve(FAKE_CAPS, has_cpr_transfer=True)
    newer = attrs.evolve(cpr, version=(10, 2, 2))
    why = upgrade.refusals(FakePlan(RUNNING), newer, cpr, "q")  # type: ignore[arg-type]
    assert why == ["QEMU 10.2.2 cannot hand over to 10.0.2: the CPR channel's handshake changed in 10.1"]
    assert upgrade.refusals(FakePlan(RUNNING), cpr, newer, "q") == []  # type: ignore[arg-type]
