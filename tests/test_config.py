"""Config parsing: the bad-config corpus and the normalisation rules."""

from __future__ import annotations

import contextlib
import os
import pathlib
import subprocess
import sys

import pytest
import tomli_w
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import REPO
from vmrun import cli, config
from vmrun.errors import ConfigError
from vmrun.sizes import GiB, MiB, format_size, parse_size

BAD = sorted((REPO / "tests" / "bad").glob("*.toml"))


@pytest.mark.parametrize("file", BAD, ids=[b.stem for b in BAD])
def test_bad_config_reports_every_problem(
    file: pathlib.Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(REPO)
    rel = str(file.relative_to(REPO))
    assert cli.main(["validate", rel]) == 2
    err = capsys.readouterr().err
    expected = file.with_suffix(".err").read_text()
    assert err == expected, f"errors for {file.name} changed:\n{err}"


def test_bad_configs_exit_2_without_traceback_in_every_command() -> None:
    for command in (["validate"], ["plan"], ["run"], ["run", "--dry-run"], ["plan", "--json"]):
        file = "tests/bad/two-sources.toml"
        args = [command[0], file, *command[1:]]
        proc = subprocess.run([sys.executable, "-m", "vmrun.cli", *args], cwd=REPO, capture_output=True, text=True)
        assert proc.returncode == 2, (args, proc.stderr)
        assert "Traceback" not in proc.stderr
        assert proc.stdout == ""
        assert "vfio[0].fd: conflicts with vfio[0].host" in proc.stderr


def test_unreadable_file(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["validate", str(tmp_path / "nope.toml")]) == 2
    assert "nope.toml: cannot read: No such file or directory" in capsys.readouterr().err


def test_validate_ok_and_bad_together(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    assert cli.main(["validate", "tests/golden/minimal.toml", "tests/bad/fds.toml"]) == 2
    out = capsys.readouterr()
    assert out.out == "tests/golden/minimal.toml: ok\n"
    assert "tests/bad/fds.toml: iommufd[0].fd" in out.err


def write(tmp_path: pathlib.Path, data: dict[str, object]) -> pathlib.Path:
    path = tmp_path / "vm.toml"
    path.write_text(tomli_w.dumps(data))
    return path


def test_normalises_pci_address_and_relative_paths(tmp_path: pathlib.Path) -> None:
    path = write(
        tmp_path,
        {
            "vm": {"name": "a", "memory": "1.5G", "kernel": "boot/vmlinuz", "qemu": "bin/qemu"},
            "iommufd": [{"id": "iommufd0"}],
            "vfio": [{"id": "d", "host": "0A:1f.7", "iommufd": "iommufd0"}],
        },
    )
    cfg = config.load(path)
    assert cfg.vfio[0].host == "0000:0a:1f.7"
    assert cfg.vm.memory == 1536 * MiB
    assert cfg.vm.kernel == tmp_path / "boot" / "vmlinuz"
    assert cfg.vm.qemu == str(tmp_path / "bin" / "qemu")
    assert cfg.vm.accel == "kvm" and cfg.vm.machine == "q35" and cfg.vm.memlock.mode == "auto"


def test_qemu_by_name_stays_a_name(tmp_path: pathlib.Path) -> None:
    cfg = config.load(write(tmp_path, {"vm": {"name": "a", "memory": "1G", "qemu": "qemu-system-aarch64"}}))
    assert cfg.vm.qemu == "qemu-system-aarch64"


def test_memlock_forms(tmp_path: pathlib.Path) -> None:
    for value, mode, size in (
        ("auto", "auto", None),
        ("off", "off", None),
        ("unlimited", "unlimited", None),
        ("9G", "size", 9 * GiB),
    ):
        cfg = config.load(write(tmp_path, {"vm": {"name": "a", "memory": "1G", "memlock": value}}))
        assert (cfg.vm.memlock.mode, cfg.vm.memlock.size) == (mode, size)


def test_error_is_collected_not_first(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, {"vm": {"name": "a b", "memory": "x", "cpus": -1}})
    with pytest.raises(ConfigError) as e:
        config.load(path)
    assert [p.path for p in e.value.problems] == ["vm.name", "vm.memory", "vm.cpus"]


@given(st.integers(min_value=1, max_value=2**44))
def test_size_roundtrip(n: int) -> None:
    assert parse_size(format_size(n)) == n if format_size(n)[-1] != "B" else True


@given(st.text(alphabet="0123456789.KMGTkmgtiB xyz", max_size=8))
def test_size_parser_never_crashes(text: str) -> None:
    with contextlib.suppress(ValueError):
        assert parse_size(text) >= 0


@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["name", "memory", "cpus", "accel", "user", "memlock", "args", "bogus"]),
        st.one_of(
            st.text(max_size=6),
            st.integers(-3, 3),
            st.booleans(),
            st.lists(st.text(max_size=3), max_size=2),
        ),
    )
)
def test_any_vm_table_gives_a_config_or_located_errors(vm: dict[str, object]) -> None:
    text = tomli_w.dumps({"vm": vm})
    try:
        config.parse(text, pathlib.Path("fuzz.toml"))
    except ConfigError as e:
        assert e.problems
        assert all(line.startswith("fuzz.toml: vm") for line in e.lines())


def validate(path: pathlib.Path | str) -> subprocess.CompletedProcess[str]:
    """`vmrun validate` in its own process, so a hang is a timeout and not a stuck suite."""
    return subprocess.run(
        [sys.executable, "-m", "vmrun.cli", "validate", str(path)], cwd=REPO, capture_output=True, text=True, timeout=20
    )


def test_only_regular_files_of_bounded_size_are_read(tmp_path: pathlib.Path) -> None:
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)  # nobody writes it: reading it would block forever
    big = tmp_path / "big.toml"
    big.write_text("# padding\n" * 210_000)
    cases = {
        fifo: f"{fifo}: is a FIFO (a config is a regular TOML file)",
        pathlib.Path("/dev/zero"): "/dev/zero: is a character device (a config is a regular TOML file)",
        tmp_path: f"{tmp_path}: is a directory (a config is a regular TOML file)",
        big: f"{big}: is larger than 1024 KiB (a VM config is far smaller)",
    }
    for path, message in cases.items():
        proc = validate(path)
        assert (proc.returncode, proc.stderr) == (2, message + "\n"), path


def test_deep_nesting_is_a_config_error(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "deep.toml"
    path.write_text("a = " + "[" * 100_000 + "]" * 100_000 + "\n")
    proc = validate(path)
    assert (proc.returncode, proc.stderr) == (
        2,
        f"{path}: arrays or tables are nested too deeply (a VM config needs a few levels)\n",
    )


def test_sizes_are_exact_and_bounded() -> None:
    assert parse_size("1.5G") == 1536 * MiB
    assert parse_size("0.001953125K") == 2
    with pytest.raises(ValueError):
        parse_size("1e3M")
    with pytest.raises(ValueError):
        parse_size("1" * 21 + "T")
    ctx = config.Context(base=pathlib.Path("."))
    with pytest.raises(config.Invalid, match=r"out of range 1M\.\.16T"):
        config.memory_size("99999999999999999999T", ctx)
    with pytest.raises(config.Invalid, match="not a whole number of 1MiB"):
        config.memory_size("1025K", ctx)
    assert config.memory_size("16T", ctx) == 16 * 1024 * GiB
