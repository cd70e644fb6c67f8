"""A kept plan is launched only when nothing it came from has changed (vmrun/launch/plan_cache.py).

Every test launches for real (vmrun as a process, QEMU's stand-in recording what it got),
once to keep the plan and again after changing one thing the plan depends on; -X importtime
tells whether the second launch planned. A change must always be seen: a stale plan would
hand QEMU a device, a file or a user the config no longer names.
"""

from __future__ import annotations

import json
import os
import pathlib
import shlex
import shutil
import subprocess
import sys
from typing import Any

import pytest

from tests.conftest import REPO, is_root
from tests.test_launch import TWO_DEVICES, config
from tests.test_lean_launch import modules_in

needs_root = pytest.mark.skipif(not is_root(), reason="switching users and owners needs root")


def launch(
    cfg: pathlib.Path,
    outdir: pathlib.Path,
    host_tree: pathlib.Path,
    *extra: str,
    env: dict[str, str] | None = None,
    redirects: str = "",
) -> tuple[subprocess.CompletedProcess[str], bool]:
    """Run `vmrun run` (`redirects`: shell syntax for fds it inherits); the process, and
    whether it planned (imported the planner)."""
    (outdir / "record.json").unlink(missing_ok=True)
    argv = [sys.executable, "-X", "importtime", "-m", "vmrun.cli", "run", str(cfg), "--host-root", str(host_tree)]
    proc = subprocess.run(
        ["/bin/sh", "-c", f"exec {redirects} {shlex.join([*argv, *extra])}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    modules = modules_in(proc.stderr)
    proc.stderr = "\n".join(line for line in proc.stderr.splitlines() if not line.startswith("import time:"))
    return proc, "vmrun.plan.planner" in modules


def recorded(outdir: pathlib.Path) -> dict[str, Any]:
    record: dict[str, Any] = json.loads((outdir / "record.json").read_text())
    return record


def launched(
    cfg: pathlib.Path, outdir: pathlib.Path, host_tree: pathlib.Path, *extra: str
) -> tuple[dict[str, Any], bool]:
    proc, planned = launch(cfg, outdir, host_tree, *extra)
    assert proc.returncode == 0, proc.stderr
    return recorded(outdir), planned


def entries() -> list[pathlib.Path]:
    return sorted((pathlib.Path(os.environ["VMRUN_STATE_DIR"]) / ".plans").glob("*.json"))


def test_second_launch_uses_the_kept_plan(outdir: pathlib.Path, host_tree: pathlib.Path) -> None:
    cfg = config(outdir, {"memlock": "6M", **({"user": "nobody"} if is_root() else {})}, **TWO_DEVICES)
    first, planned = launched(cfg, outdir, host_tree)
    assert planned
    (entry,) = entries()
    assert entry.stat().st_mode & 0o777 == 0o600 and entry.parent.stat().st_mode & 0o777 == 0o700
    second, planned = launched(cfg, outdir, host_tree, "--paused")
    assert not planned, "the second launch planned again"
    # The same QEMU, the same files at the same numbers, the same identity and limit.
    assert second["argv"] == [*first["argv"], "-S"]
    for k in ("uid", "gid", "groups", "memlock", "env", "cap_eff"):
        assert second[k] == first[k], k

    def files(record: dict[str, Any]) -> dict[str, str]:  # pipes and sockets are new each time
        return {fd: what.split(":[")[0] for fd, what in record["fds"].items()}

    assert files(second) == files(first) and len(first["fds"]) == 8
    third, planned = launched(cfg, outdir, host_tree)
    assert not planned and third["argv"] == first["argv"]


def test_dry_run_neither_uses_nor_keeps_a_plan(outdir: pathlib.Path, host_tree: pathlib.Path) -> None:
    cfg = config(outdir, {"memlock": "off"}, **TWO_DEVICES)
    proc, planned = launch(cfg, outdir, host_tree, "--dry-run")
    assert proc.returncode == 0 and planned and not entries()
    launched(cfg, outdir, host_tree)
    proc, planned = launch(cfg, outdir, host_tree, "--dry-run")
    assert proc.returncode == 0 and planned and "-object" in proc.stdout


def test_an_edited_config_is_planned_again(outdir: pathlib.Path, host_tree: pathlib.Path) -> None:
    cfg = config(outdir, {"memory": "64M", "memlock": "off"}, **TWO_DEVICES)
    launched(cfg, outdir, host_tree)
    # Same size, and written within the same clock tick as far as mtime can tell.
    cfg.write_text(cfg.read_text().replace('"64M"', '"96M"'))
    record, planned = launched(cfg, outdir, host_tree)
    assert planned and "96M" in " ".join(record["argv"])
    record, planned = launched(cfg, outdir, host_tree)
    assert not planned and "96M" in " ".join(record["argv"])


def test_caller_fds_are_checked_on_every_launch(
    tmp_path: pathlib.Path, outdir: pathlib.Path, host_tree: pathlib.Path
) -> None:
    """The plan names fds the caller passes; whether this caller passed them is the launch's
    to check, kept plan or not."""
    cfg = config(outdir, {"memlock": "off"}, iommufd=[{"id": "iommufd0", "fd": 7}], vfio=[])
    mine = tmp_path / "caller-iommu"
    mine.write_text("")
    proc, planned = launch(cfg, outdir, host_tree, redirects=f"7<>{shlex.quote(str(mine))}")
    assert proc.returncode == 0 and planned, proc.stderr
    assert recorded(outdir)["fds"]["7"] == str(mine)
    proc, planned = launch(cfg, outdir, host_tree)
    assert proc.returncode == 1 and not planned, proc.stderr
    assert "vmrun: fd 7 (iommufd iommufd0 (from the caller)) is not open in vmrun's process" in proc.stderr
    assert not (outdir / "record.json").exists()
    proc, planned = launch(cfg, outdir, host_tree, redirects=f"7<>{shlex.quote(str(mine))}")
    assert proc.returncode == 0 and not planned and recorded(outdir)["fds"]["7"] == str(mine)


def test_a_new_or_changed_dropin_is_planned_again(outdir: pathlib.Path, host_tree: pathlib.Path) -> None:
    cfg = config(outdir, {"memory": "64M", "memlock": "off"}, **TWO_DEVICES)
    launched(cfg, outdir, host_tree)
    dropins = cfg.with_name(cfg.name + ".d")
    dropins.mkdir()
    (dropins / "10-memory.toml").write_text('[vm]\nmemory = "128M"\n')
    record, planned = launched(cfg, outdir, host_tree)
    assert planned and "128M" in " ".join(record["argv"])
    (dropins / "10-memory.toml").write_text('[vm]\nmemory = "256M"\n')
    record, planned = launched(cfg, outdir, host_tree)
    assert planned and "256M" in " ".join(record["argv"])
    # A drop-in anyone may write is refused, whatever was launched from it before.
    (dropins / "10-memory.toml").chmod(0o666)
    proc, _ = launch(cfg, outdir, host_tree)
    assert proc.returncode == 2 and "is writable by every user" in proc.stderr, proc.stderr
    assert not (outdir / "record.json").exists()


def test_a_device_given_another_cdev_is_opened_at_its_new_cdev(outdir: pathlib.Path, host_tree: pathlib.Path) -> None:
    cfg = config(outdir, {"memlock": "off"}, **TWO_DEVICES)
    first, _ = launched(cfg, outdir, host_tree)
    assert first["fds"]["4"].endswith("/vfio0") and first["fds"]["5"].endswith("/vfio1")
    # Both devices were unbound and bound again, in the other order: their cdevs swapped.
    # The kept plan would hand dev0's QEMU device the other device.
    a = host_tree / "sys/devices/pci0000:00/0000:01:00.0/vfio-dev"
    b = host_tree / "sys/devices/pci0000:00/0000:02:00.0/vfio-dev"
    (a / "vfio0").rename(a / "vfio1")
    (b / "vfio1").rename(b / "vfio0")
    second, planned = launched(cfg, outdir, host_tree)
    assert planned
    assert second["fds"]["4"].endswith("/vfio1") and second["fds"]["5"].endswith("/vfio0")


def test_a_device_bound_to_a_host_driver_is_not_launched(outdir: pathlib.Path, host_tree: pathlib.Path) -> None:
    cfg = config(outdir, {"memlock": "off"}, **TWO_DEVICES)
    launched(cfg, outdir, host_tree)
    driver = host_tree / "sys/devices/pci0000:00/0000:02:00.0/driver"
    driver.unlink()
    (host_tree / "sys/bus/pci/drivers/nvme").mkdir()
    driver.symlink_to("../../../bus/pci/drivers/nvme")
    proc, planned = launch(cfg, outdir, host_tree)
    assert planned and proc.returncode == 1, proc.stderr
    assert "nvme" in proc.stderr and not (outdir / "record.json").exists()


@needs_root
def test_a_disk_whose_header_now_names_a_root_only_file_is_refused(
    outdir: pathlib.Path, host_tree: pathlib.Path
) -> None:
    def qcow2(backing: bytes) -> bytes:
        """A version 2 header (72 bytes); the backing file's name at offset 512."""
        offset = 512 if backing else 0
        header = b"QFI\xfb" + (2).to_bytes(4, "big") + offset.to_bytes(8, "big") + len(backing).to_bytes(4, "big")
        return header.ljust(512, b"\0") + backing.ljust(1024, b"\0")

    disk = outdir / "disk.img"
    disk.write_bytes(qcow2(b""))
    disk.chmod(0o666)
    secret = outdir / "secret"
    secret.write_bytes(b"root's own")
    secret.chmod(0o600)
    cfg = config(outdir, {"user": "nobody"}, disk=[{"id": "root", "path": str(disk), "format": "qcow2"}])
    launched(cfg, outdir, host_tree)
    # The VM's user rewrites its own image: a qcow2 header whose backing file is root's.
    disk.write_bytes(qcow2(str(secret).encode()))
    proc, planned = launch(cfg, outdir, host_tree)
    assert planned and proc.returncode == 1, proc.stderr
    assert f"backing file {secret}: nobody may not open it" in proc.stderr
    assert not (outdir / "record.json").exists()


def test_the_callers_locale_reaches_qemu_as_it_is_now(outdir: pathlib.Path, host_tree: pathlib.Path) -> None:
    cfg = config(outdir, {"memlock": "off"}, **TWO_DEVICES)
    launched(cfg, outdir, host_tree)
    env = {**os.environ, "LANG": "de_DE.UTF-8", "TZ": "Europe/Berlin"}
    proc, planned = launch(cfg, outdir, host_tree, env=env)
    assert proc.returncode == 0 and planned, proc.stderr
    assert recorded(outdir)["env"]["LANG"] == "de_DE.UTF-8" and recorded(outdir)["env"]["TZ"] == "Europe/Berlin"


def test_a_replaced_qemu_binary_is_planned_again(outdir: pathlib.Path, host_tree: pathlib.Path) -> None:
    cfg = config(outdir, {"memlock": "off"}, **TWO_DEVICES)
    launched(cfg, outdir, host_tree)
    qemu = outdir / "fake-qemu"
    qemu.write_bytes(qemu.read_bytes() + b"\n# a new build\n")
    _, planned = launched(cfg, outdir, host_tree)
    assert planned


def test_an_unreadable_or_foreign_entry_is_not_used(outdir: pathlib.Path, host_tree: pathlib.Path) -> None:
    cfg = config(outdir, {"memlock": "off"}, **TWO_DEVICES)
    launched(cfg, outdir, host_tree)
    (entry,) = entries()
    entry.write_text("{not json")
    record, planned = launched(cfg, outdir, host_tree)
    assert planned and record["argv"]
    _, planned = launched(cfg, outdir, host_tree)
    assert not planned  # the broken entry was replaced by a good one


@needs_root
@pytest.mark.parametrize("attack", ["foreign entry", "symlinked entry", "hard-linked entry", "open directory"])
def test_an_entry_someone_else_could_have_written_is_not_trusted(
    outdir: pathlib.Path, host_tree: pathlib.Path, attack: str
) -> None:
    """vmrun runs as root, and a kept plan says what root opens and executes: an entry is
    only read from vmrun's own private directory, as a file of vmrun's with one name."""
    cfg = config(outdir, {"memlock": "off"}, **TWO_DEVICES)
    launched(cfg, outdir, host_tree)
    (entry,) = entries()
    # The attacker's version: same key, but QEMU is a program of their choosing.
    evil = json.loads(entry.read_text())
    evil["plan"]["argv"][0] = "/bin/false"
    planted = outdir / "planted.json"
    planted.write_text(json.dumps(evil))
    if attack == "foreign entry":
        entry.write_text(json.dumps(evil))
        os.chown(entry, 65534, 65534)
    elif attack == "symlinked entry":
        entry.unlink()
        entry.symlink_to(planted)
    elif attack == "hard-linked entry":
        entry.unlink()
        os.link(planted, entry)
    else:
        entry.write_text(json.dumps(evil))
        entry.parent.chmod(0o777)
    record, planned = launched(cfg, outdir, host_tree)
    assert planned and record["argv"][0].endswith("fake-qemu")


def test_the_key_reads_dropins_only_where_the_loader_would(tmp_path: pathlib.Path) -> None:
    """vmrun runs as root and takes the key before the loader has checked the drop-in
    directory: what it opens there must be what the loader would open."""
    from vmrun.launch import plan_cache

    cfg = tmp_path / "vm.toml"
    cfg.write_text('[vm]\nname = "t"\nmemory = "64M"\n')
    dropins = tmp_path / "vm.toml.d"
    dropins.mkdir(mode=0o755)
    (dropins / "10.toml").write_text('[vm]\nmemory = "96M"\n')
    (dropins / "notes.txt").write_text("not a drop-in")
    os.mkfifo(dropins / "20.toml")  # opening it to read would hang

    def contents() -> dict[str, Any]:
        files = plan_cache.key(str(cfg), "/")["files"]
        return {pathlib.Path(f[0]).name: f[-1] for f in files}

    seen = contents()
    assert seen["vm.toml"].startswith("[vm]") and seen["10.toml"] == '[vm]\nmemory = "96M"\n'
    assert seen["20.toml"] == "is a FIFO" and "notes.txt" not in seen  # looked at, never opened to read
    dropins.chmod(0o777)  # anyone may swap a drop-in for a device node now: nothing in it is read
    seen = contents()
    assert "10.toml" not in seen and "is writable by every user" in seen["vm.toml.d"]
    dropins.chmod(0o755)
    before = plan_cache.key(str(cfg), "/")
    (dropins / "10.toml").write_text('[vm]\nmemory = "128M"\n')
    assert plan_cache.canonical(plan_cache.key(str(cfg), "/")) != plan_cache.canonical(before)


def test_a_launch_from_a_removed_directory_plans_and_keeps_nothing(
    outdir: pathlib.Path, host_tree: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    """No working directory, no key (it holds the directory a relative path is read from):
    the launch plans, and says nothing about a cache that is only a cache."""
    cfg = config(outdir, {"memlock": "off"}, **TWO_DEVICES)
    gone = tmp_path / "gone"
    gone.mkdir()
    vmrun = f"{sys.executable} -c 'import sys; from vmrun.cli import main; sys.exit(main())'"
    proc = subprocess.run(
        ["/bin/sh", "-c", f"cd {gone} && rmdir {gone} && exec {vmrun} run {cfg} --host-root {host_tree}"],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert recorded(outdir)["argv"] and entries() == []


def test_a_change_to_any_module_of_vmrun_plans_again(
    outdir: pathlib.Path, host_tree: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    """The key holds every module of every stage package: an edited submodule (here
    host/numa.py, not on the kept-plan path at all) means the next launch plans afresh."""
    code = tmp_path / "code"
    shutil.copytree(REPO / "vmrun", code / "vmrun", ignore=shutil.ignore_patterns("__pycache__"))
    cfg = config(outdir, {"memlock": "off"}, **TWO_DEVICES)
    env = {**os.environ, "PYTHONPATH": str(code)}

    def run() -> bool:
        # -P: the copy is the vmrun imported, not the checkout in the working directory.
        argv = [sys.executable, "-P", "-X", "importtime", "-m", "vmrun.cli", "run", str(cfg), "--host-root"]
        proc = subprocess.run([*argv, str(host_tree)], capture_output=True, text=True, env=env, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "vmrun.launch.start" in modules_in(proc.stderr), "the run imported no vmrun"
        return "vmrun.plan.planner" in modules_in(proc.stderr)

    assert run(), "the first launch had no plan to reuse"
    assert not run(), "an unchanged vmrun planned again"
    numa = code / "vmrun" / "host" / "numa.py"
    numa.write_text(numa.read_text() + "# edited\n")
    assert run(), "a vmrun with an edited host/numa.py launched the plan the old one made"
    assert not run()
