"""`vmrun run` imports what launching needs and nothing more: not the other commands' modules,
not QMP, psutil or subprocess (a fresh capability cache spawns no QEMU), not the heavy
stdlib modules the launch does without. benchmarks/launch.py measures what that buys; this
keeps it from regressing unnoticed (timing itself is too noisy on a shared machine to test)."""

from __future__ import annotations

import hashlib
import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig

import pytest
import tomli_w

from tests.conftest import REPO, is_root
from vmrun import cli
from vmrun.plan.planner import derived_mac, sha256

# What `vmrun run` must not import. Each line says who needs them instead.
FORBIDDEN = {
    # the other commands' modules: every one of running VMs (ps, status, stop, qmp: psutil and
    # pidfds) and of the config tools (init, import, show, schema, smoke, check) is below these
    "vmrun.control",
    "vmrun.tools",
    "vmrun.plan.render",  # plan, run --dry-run
    "vmrun.plan.attachment",
    "vmrun.host.pci",  # devices
    "vmrun.launch.bind",  # bind, unbind, prepare
    "vmrun.base.tables",
    "vmrun.qemu.cmdline",  # import
    # running VMs, QEMU's capability probe, other commands
    "qemu",
    "qemu.qmp",
    "asyncio",
    "psutil",
    "subprocess",
    "shtab",
    "tomli_w",
    # heavy stdlib modules: a plain `run` needs no argparse (nor its gettext, its formatter's
    # shutil, its translations' locale), hashlib would load OpenSSL for a derived MAC
    "argparse",
    "gettext",
    "shutil",
    "locale",
    "hashlib",
    "difflib",
    "fractions",
    "decimal",
    "secrets",
    "random",
    "tempfile",
    "shlex",
    "email",
    "dataclasses",
    "xml",
}


# What the installed `vmrun` script runs.
CONSOLE_SCRIPT = "import sys; from vmrun.cli import main; sys.exit(main())"


def imported_by(argv: list[str], env: dict[str, str]) -> set[str]:
    """The modules a bare interpreter (no site hooks, vmrun from this checkout) imports running
    `vmrun ARGV`, from -X importtime."""
    paths = [str(REPO), sysconfig.get_paths()["purelib"]]
    proc = subprocess.run(
        [sys.executable, "-S", "-P", "-X", "importtime", "-c", CONSOLE_SCRIPT, *argv],
        env={**env, "PYTHONPATH": os.pathsep.join(paths)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return modules_in(proc.stderr)


def modules_in(importtime: str) -> set[str]:
    """The modules named in -X importtime's lines of `importtime` (a process's stderr)."""
    return {
        line.split("|")[2].strip()
        for line in importtime.splitlines()
        if line.startswith("import time:") and "|" in line and "imported package" not in line
    }


@pytest.fixture
def launch_config(outdir: pathlib.Path, host_tree: pathlib.Path) -> pathlib.Path:
    """A VM that takes every common launch step: two VFIO devices on iommufd, a disk opened as
    the VM user, user networking with a derived MAC, QMP; QEMU is the stand-in."""
    disk = outdir / "disk.raw"
    disk.write_bytes(b"\0" * 65536)
    disk.chmod(0o666)
    vm = {
        "name": "lean",
        "memory": "64M",
        "memlock": "off",
        "qemu": str(outdir / "fake-qemu"),
        "env": {"VMRUN_FAKE_QEMU_OUT": str(outdir / "record.json")},
        **({"user": "nobody"} if is_root() else {}),
    }
    path = outdir / "vm.toml"
    path.write_text(
        tomli_w.dumps(
            {
                "vm": vm,
                "iommufd": [{"id": "iommufd0"}],
                "vfio": [
                    {"id": "dev0", "host": "0000:01:00.0", "iommufd": "iommufd0"},
                    {"id": "dev1", "host": "0000:02:00.0", "iommufd": "iommufd0"},
                ],
                "disk": [{"id": "root", "path": str(disk)}],
                "net": [{"id": "net0", "forwards": ["tcp:2222:22"]}],
            }
        )
    )
    return path


def within(modules: set[str], names: set[str]) -> list[str]:
    """The modules that are one of `names` or inside one of them (a package's modules)."""
    return sorted(m for m in modules if m in names or any(m.startswith(f"{n}.") for n in names))


# What a launch from a kept plan (plan_cache) does without as well: the typed model and all
# that attrs brings, the TOML parser, pathlib, the planner.
PLANNING = {
    "attrs",
    "typing",
    "inspect",
    "pathlib",
    "tomllib",
    "vmrun.config.loader",
    "vmrun.config.model",
    "vmrun.config.keytable",
    "vmrun.host.facts",
    "vmrun.plan",
}


def test_run_imports_only_what_launching_needs(
    launch_config: pathlib.Path, outdir: pathlib.Path, host_tree: pathlib.Path
) -> None:
    run = ["run", str(launch_config), "--host-root", str(host_tree)]
    env = dict(os.environ)
    # The first launch probes QEMU (and may import subprocess); the ones measured find the cache fresh.
    first = subprocess.run([sys.executable, "-m", "vmrun.cli", *run], env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    probes = outdir / "probes.log"
    probed = probes.read_text() if probes.exists() else ""
    kept = pathlib.Path(env["VMRUN_STATE_DIR"]) / ".plans"
    assert len(list(kept.iterdir())) == 1

    for planning in (True, False):  # a plan made afresh, then the one it kept
        if planning:
            shutil.rmtree(kept)
        (outdir / "record.json").unlink()

        modules = imported_by(run, env)

        assert (outdir / "record.json").exists(), "QEMU did not run: the import check saw no launch"
        assert "vmrun.launch.launcher" in modules and "vmrun.kernel.opener" in modules  # the launch's path
        assert ("vmrun.plan.planner" in modules) == planning
        assert not within(modules, FORBIDDEN), f"`vmrun run` imported {within(modules, FORBIDDEN)}"
        if not planning:
            assert not within(modules, PLANNING), f"a launch from a kept plan imported {within(modules, PLANNING)}"
        assert (probes.read_text() if probes.exists() else "") == probed, "a fresh capability cache spawned QEMU"


def test_plain_run_arguments_read_as_argparse_reads_them() -> None:
    for argv in (
        ["run", "a.toml"],
        ["run", "--dry-run", "a.toml"],
        ["run", "a.toml", "--paused", "--host-root", "/tmp/h"],
        ["run", "--host-root", "h", "--dry-run", "--paused", "a.toml"],
    ):
        assert vars(cli.plain_run(argv)) == vars(cli.parser().parse_args(argv)), argv
    # Everything else is argparse's to read, and to explain.
    for argv in (
        ["run"],
        ["run", "--help"],
        ["run", "a.toml", "b.toml"],
        ["run", "--host-root"],
        ["run", "--host-root", "--dry-run", "a.toml"],
        ["run", "--host-root=h", "a.toml"],
        ["run", "--dry", "a.toml"],
        ["run", "--", "a.toml"],
        ["run", "-x.toml"],
        ["plan", "a.toml"],
        [],
    ):
        assert cli.plain_run(argv) is None, argv


# A command line for each command, parsed alike by its own parser and by the whole one.
EXAMPLES = {
    "validate": ["validate", "a.toml", "b.toml"],
    "plan": ["plan", "--json", "a.toml", "--host-root", "h"],
    "check": ["check", "a.toml"],
    "devices": ["devices", "0000:01:00.0", "--group", "3"],
    "bind": ["bind", "01:00.0"],
    "unbind": ["unbind", "01:00.0", "02:00.0"],
    "prepare": ["prepare", "a.toml"],
    "run": ["run", "--paused", "a.toml"],
    "ps": ["ps", "-a"],
    "status": ["status", "vm", "--json"],
    "stop": ["stop", "vm", "--timeout", "5"],
    "qmp": ["qmp", "vm", "qom-list", '{"path": "/"}'],
    "attach": ["attach", "vm", "f.toml"],
    "detach": ["detach", "vm", "gpu0"],
    "smoke": ["smoke", "a.toml", "--boot", "login:"],
    "completion": ["completion", "bash"],
    "init": ["init", "vm", "-d", "01:00.0", "--legacy"],
    "import": ["import", "--name", "vm", "--", "-m", "1G"],
    "show": ["show", "a.toml", "--toml"],
    "schema": ["schema", "--dropin"],
}


@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_a_commands_own_parser_reads_as_the_whole_one(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    whole, own = cli.parser(), cli.parser(name)
    if name in EXAMPLES:
        assert own.parse_args(EXAMPLES[name]) == whole.parse_args(EXAMPLES[name])
    helps = []
    for p in (whole, own):
        with pytest.raises(SystemExit) as exit:
            p.parse_args([name, "--help"])
        assert exit.value.code == 0
        helps.append(capsys.readouterr().out)
    assert helps[0] == helps[1]
    assert f"usage: vmrun {name}" in helps[0]


def test_derived_macs_do_not_change() -> None:
    for data in (b"", b"demo/net0", "vm/ünï".encode()):
        assert sha256(data) == hashlib.sha256(data).digest()
    assert derived_mac("demo", "net0") == "52:54:00:" + ":".join(
        f"{b:02x}" for b in hashlib.sha256(b"demo/net0").digest()[:3]
    )
