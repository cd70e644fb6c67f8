"""Config parsing: the bad-config corpus and the normalisation rules."""

from __future__ import annotations

import contextlib
import os
import pathlib
import socket
import subprocess
import sys
from collections.abc import Mapping
from typing import Any

import pytest
import tomli_w
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import REPO
from vmrun import cli
from vmrun.base.errors import ConfigError, UsageError
from vmrun.base.sizes import MAX_DIGITS, GiB, KiB, MiB, SizeError, TiB, format_size, parse_size
from vmrun.config import files as config_files
from vmrun.config import keytable, loader, parsers, quoting, rules

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


def write(tmp_path: pathlib.Path, data: Mapping[str, object]) -> pathlib.Path:
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
    cfg = loader.load(path)
    assert cfg.vfio[0].host == "0000:0a:1f.7"
    assert cfg.vm.memory == 1536 * MiB
    assert cfg.vm.kernel == tmp_path / "boot" / "vmlinuz"
    assert cfg.vm.qemu == str(tmp_path / "bin" / "qemu")
    assert cfg.vm.accel == "kvm" and cfg.vm.machine == "q35" and cfg.vm.memlock.mode == "auto"


def test_qemu_by_name_stays_a_name(tmp_path: pathlib.Path) -> None:
    cfg = loader.load(write(tmp_path, {"vm": {"name": "a", "memory": "1G", "qemu": "qemu-system-aarch64"}}))
    assert cfg.vm.qemu == "qemu-system-aarch64"


def test_memlock_forms(tmp_path: pathlib.Path) -> None:
    for value, mode, size in (
        ("auto", "auto", None),
        ("off", "off", None),
        ("unlimited", "unlimited", None),
        ("9G", "size", 9 * GiB),
    ):
        cfg = loader.load(write(tmp_path, {"vm": {"name": "a", "memory": "1G", "memlock": value}}))
        assert (cfg.vm.memlock.mode, cfg.vm.memlock.size) == (mode, size)


def test_error_is_collected_not_first(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, {"vm": {"name": "a b", "memory": "x", "cpus": -1}})
    with pytest.raises(ConfigError) as e:
        loader.load(path)
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
        loader.parse(text, pathlib.Path("fuzz.toml"))
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
    # A float would round this; the exact product is what the text says.
    assert parse_size("999999999999999999999T") == 999999999999999999999 * TiB
    assert parse_size("1" * MAX_DIGITS + "T") == int("1" * MAX_DIGITS) * TiB
    for text, reason in (
        ("1e3M", "is not a size"),
        ("1" * (MAX_DIGITS + 1) + "T", f"has {MAX_DIGITS + 1} digits, at most {MAX_DIGITS}"),
        ("9" * 400 + "G", f"has 400 digits, at most {MAX_DIGITS}"),
        ("1.0000000001K", "is not a whole number of bytes"),
        ("1\u212a", "is not a size"),  # the Kelvin sign, which IGNORECASE alone takes for K
        ("1K\u0130B", "is not a size"),  # a dotted capital I
        ("\u0661G", "is not a size"),  # an Arabic-Indic digit
        ("8G\n", "is not a size"),
    ):
        with pytest.raises(SizeError) as e:
            parse_size(text)
        assert e.value.reason == reason, text


CTX = parsers.Context(base=pathlib.Path("."))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0.5K", '"0.5K" is 512 bytes, not a whole number of MiB'),
        ("1.5K", '"1.5K" is 1536 bytes, not a whole number of MiB'),
        ("1025K", '"1025K" is 1049600 bytes, not a whole number of MiB'),
        ("100000B", '"100000B" is not a size'),
        ("0M", '"0M" is out of range 1M..16T'),
        ("16385G", '"16385G" is out of range 1M..16T'),
        ("99999999999999999999T", '"99999999999999999999T" is out of range 1M..16T'),
        ("9" * 400 + "T", "has 400 digits, at most 24"),
    ],
)
def test_memory_is_whole_mib_within_bounds(text: str, message: str) -> None:
    with pytest.raises(parsers.Invalid) as e:
        parsers.memory_size(text, CTX)
    assert message in e.value.message
    assert e.value.hint is None or e.value.hint  # never an empty hint


def test_memory_and_memlock_limits() -> None:
    assert parsers.memory_size("1.5G", CTX) == 1536 * MiB
    assert parsers.memory_size("1M", CTX) == MiB
    assert parsers.memory_size("16T", CTX) == 16 * TiB
    assert parsers.memlock_size("1K", CTX) == KiB
    assert parsers.memlock_size("64T", CTX) == 64 * TiB
    with pytest.raises(parsers.Invalid, match=r"out of range 1K\.\.64T"):
        parsers.memlock_size("65T", CTX)
    with pytest.raises(parsers.Invalid) as e:
        parsers.memory_size("1025K", CTX)
    assert e.value.hint == 'round it to whole MiB: "1M" or "2M"'


def problems_of(tmp_path: pathlib.Path, data: Mapping[str, object]) -> list[str]:
    with pytest.raises(ConfigError) as e:
        loader.load(write(tmp_path, data))
    return [f"{p.path}: {p.message}" for p in e.value.problems]


VM = {"name": "t", "memory": "64M"}


@pytest.mark.parametrize("ident", sorted(rules.RESERVED_IDS))
@pytest.mark.parametrize("section", ["iommufd", "vfio", "disk", "net"])
def test_reserved_ids_are_refused_in_every_section(tmp_path: pathlib.Path, section: str, ident: str) -> None:
    entry: dict[str, object] = {"id": ident}
    entry |= {"vfio": {"host": "01:00.0"}, "disk": {"path": "a.raw"}}.get(section, {})
    found = problems_of(tmp_path, {"vm": VM, section: [entry]})
    assert f'{section}[0].id: "{ident}" is the id of {rules.RESERVED_IDS[ident]}, which vmrun adds' in found


def test_id_lengths_and_backing_names(tmp_path: pathlib.Path) -> None:
    def disk_ids(*ids: str) -> list[str]:
        try:
            loader.load(write(tmp_path, {"vm": VM, "disk": [{"id": i, "path": "a.raw"} for i in ids]}))
        except ConfigError as e:
            return [p.path for p in e.problems]
        return []

    assert disk_ids("d" * 22, "d-b", "d-bx", "d-b1x", "b1") == []
    assert disk_ids("d" * 23, "d-b1", "disk-b10", "x-b0") == ["disk[0].id", "disk[1].id", "disk[2].id", "disk[3].id"]
    nets = [{"id": "n" * 63}, {"id": "m" * 64}]
    assert problems_of(tmp_path, {"vm": VM, "net": nets}) == ["net[1].id: is 64 characters long, at most 63"]
    assert loader.load(write(tmp_path, {"vm": {**VM, "name": "n" * 64}})).vm.name == "n" * 64
    assert problems_of(tmp_path, {"vm": {**VM, "name": "n" * 65}}) == ["vm.name: is 65 characters long, at most 64"]


@pytest.mark.parametrize("name", ["t\n", "t\r", ".t", "-t", "_t", "..", "t/x", "t\x00", "t\u0661", "\u212a"])
def test_bad_names(tmp_path: pathlib.Path, name: str) -> None:
    [found] = problems_of(tmp_path, {"vm": {**VM, "name": name}})
    assert found.startswith("vm.name: ")


def test_every_pattern_matches_the_whole_string(tmp_path: pathlib.Path) -> None:
    entries = {
        "vm": {**VM, "machine": "q35\n", "cpu": "max\n", "user": "nobody\n"},
        "iommufd": [{"id": "io\n"}],
        "vfio": [{"id": "v", "host": "0000:01:00.0\n", "props": {"x-vga\n": True}}],
        "disk": [{"id": "d", "path": "a.raw", "serial": "S1\n"}],
        "net": [
            {"id": "n", "forwards": ["tcp:2222:22\n"], "mac": "52:54:00:12:34:56\n"},
            {"id": "t", "type": "tap", "ifname": "tap0\n"},
        ],
    }
    assert [p.split(":")[0] for p in problems_of(tmp_path, entries)] == [
        "vm.machine",
        "vm.cpu",
        "vm.user",
        "iommufd[0].id",
        "vfio[0].host",
        'vfio[0].props."x-vga\\n"',
        "disk[0].serial",
        "net[0].forwards[0]",
        "net[0].mac",
        "net[1].ifname",
    ]
    assert sum(p.startswith("vfio[0].props") for p in problems_of(tmp_path, entries)) == 1


def test_nul_is_refused_in_every_string(tmp_path: pathlib.Path) -> None:
    found = problems_of(
        tmp_path,
        {
            "vm": {
                **VM,
                "append": "a\0",
                "args": ["-S", "\0", "x\0y"],
                "kernel": "/k\0",
                "initrd": "/i\0",
                "qemu": "q\0",
                "env": {"A": "\0"},
                "firmware": "uefi",
                "uefi_vars": "v\0",
            },
            "vfio": [{"id": "v", "sysfsdev": "/sys/x\0", "props": {"romfile": "\0"}}],
            "disk": [{"id": "d", "path": "\0"}],
        },
    )
    assert sorted(found) == sorted(
        f"{key}: contains a NUL character"
        for key in (
            "vm.append",
            "vm.args[1]",
            "vm.args[2]",
            "vm.kernel",
            "vm.initrd",
            "vm.qemu",
            "vm.env.A",
            "vm.uefi_vars",
            "vfio[0].sysfsdev",
            "vfio[0].props.romfile",
            "disk[0].path",
        )
    )


def test_paths_refuse_control_characters_and_unknown_homes(tmp_path: pathlib.Path) -> None:
    found = problems_of(
        tmp_path,
        {"vm": {**VM, "kernel": "/boot/vmlinuz\x7f", "qemu": "/usr/bin/qemu\n"}, "disk": [{"id": "d", "path": "a\tb"}]},
    )
    assert [f.split(":")[0] for f in found] == ["vm.kernel", "vm.qemu", "disk[0].path"]
    assert all("contains a control character" in f for f in found)
    [home] = problems_of(tmp_path, {"vm": {**VM, "kernel": "~no-such-user-for-vmrun/k"}})
    assert home == 'vm.kernel: "~no-such-user-for-vmrun/k": no home directory for ~no-such-user-for-vmrun'


def test_sysfsdev_is_normalised_and_stays_under_sys(tmp_path: pathlib.Path) -> None:
    def sysfsdev(path: str) -> str | None:
        cfg = loader.load(
            write(tmp_path, {"vm": VM, "vfio": [{"id": "v", "driver": "vfio-platform", "sysfsdev": path}]})
        )
        return cfg.vfio[0].sysfsdev

    assert sysfsdev("/sys/bus/platform/devices/x/") == "/sys/bus/platform/devices/x"
    assert sysfsdev("/sys//bus/./platform/devices/x") == "/sys/bus/platform/devices/x"
    for bad in ("/sys/..", "/sys/bus/../../etc", "/sys/", "/sys", "sys/x"):
        [found] = problems_of(tmp_path, {"vm": VM, "vfio": [{"id": "v", "driver": "vfio-platform", "sysfsdev": bad}]})
        assert found.startswith("vfio[0].sysfsdev: "), bad


def test_forwards_report_every_bad_item_and_normalise_addresses(tmp_path: pathlib.Path) -> None:
    forwards = ["tcp:2222:22", 7, "bad", "udp:0.0.0.0:5353:53", "tcp:1.2.3.04:1:2", "tcp:\u0661\u0662:22", ["x"]]
    found = problems_of(tmp_path, {"vm": VM, "net": [{"id": "n", "forwards": forwards}]})
    assert [f.split(": ")[0] for f in found] == [f"net[0].forwards[{i}]" for i in (1, 2, 4, 5, 6)]
    cfg = loader.load(write(tmp_path, {"vm": VM, "net": [{"id": "n", "forwards": ["udp:10.0.0.1:53:5353", "1:2"]}]}))
    assert [f.hostfwd() for f in cfg.net[0].forwards] == ["udp:10.0.0.1:53-:5353", "tcp:127.0.0.1:1-:2"]


def test_args_report_every_bad_item(tmp_path: pathlib.Path) -> None:
    found = problems_of(tmp_path, {"vm": {**VM, "args": ["-S", 1, True, "\0", []]}})
    assert [f.split(": ")[0] for f in found] == ["vm.args[1]", "vm.args[2]", "vm.args[3]", "vm.args[4]"]


def test_props_integers_fit_qemu(tmp_path: pathlib.Path) -> None:
    def props(**values: object) -> list[str]:
        try:
            loader.load(write(tmp_path, {"vm": VM, "vfio": [{"id": "v", "host": "01:00.0", "props": values}]}))
        except ConfigError as e:
            return [p.path for p in e.problems]
        return []

    assert props(a=2**64 - 1, b=-(2**63), c=True, d="x,y=z") == []
    assert props(a=2**64, b=-(2**63) - 1) == ["vfio[0].props.a", "vfio[0].props.b"]
    # QEMU takes the last of two drivers: props.driver would make the device another one.
    assert props(driver="e1000", id="x", host="x", sysfsdev="x", fd=3, iommufd="x") == [
        f"vfio[0].props.{key}" for key in ("driver", "id", "host", "sysfsdev", "fd", "iommufd")
    ]


def test_env_sandbox_trusted(tmp_path: pathlib.Path) -> None:
    cfg = loader.load(write(tmp_path, {"vm": VM, "disk": [{"id": "d", "path": "a.raw"}]}))
    assert (cfg.vm.env, cfg.vm.sandbox, cfg.disk[0].trusted) == ((), True, False)
    data: dict[str, object] = {
        "vm": {**VM, "env": {"Z": "1", "A_B": "x=y\nz", "_a1": ""}, "sandbox": False},
        "disk": [{"id": "d", "path": "a.raw", "trusted": True}],
    }
    cfg = loader.load(write(tmp_path, data))
    assert cfg.vm.env == (("Z", "1"), ("A_B", "x=y\nz"), ("_a1", ""))  # in the order written
    assert (cfg.vm.sandbox, cfg.disk[0].trusted) == (False, True)
    env = {"HOME": "/", "USER": "u", "LOGNAME": "u", "1A": "x", "A=B": "x", "A\n": "x", "N": "\0", "I": 1}
    found = problems_of(
        tmp_path, {"vm": {**VM, "env": env, "sandbox": "on"}, "disk": [{"id": "d", "path": "a", "trusted": 1}]}
    )
    assert [f.split(": ")[0] for f in found] == [
        "vm.sandbox",
        "vm.env.HOME",
        "vm.env.USER",
        "vm.env.LOGNAME",
        "vm.env.1A",
        'vm.env."A=B"',
        'vm.env."A\\n"',
        "vm.env.N",
        "vm.env.I",
        "disk[0].trusted",
    ]
    assert problems_of(tmp_path, {"vm": {**VM, "env": ["A=1"]}}) == [
        'vm.env: expected a table of environment variables, e.g. { RUST_LOG = "info" }, got array ["A=1"]'
    ]


@pytest.mark.parametrize(
    "text",
    [
        "a = " + "[" * 10_000 + "]" * 10_000,
        "a = " + "{a=" * 10_000 + "1" + "}" * 10_000,
        "[vm]\nargs = " + "[" * 10_000 + "]" * 10_000,
    ],
    ids=["arrays", "inline-tables", "in-a-key"],
)
def test_deep_nesting_in_process(text: str) -> None:
    with pytest.raises(ConfigError) as e:
        loader.parse(text, pathlib.Path("deep.toml"))
    assert e.value.lines() == ["deep.toml: arrays or tables are nested too deeply (a VM config needs a few levels)"]


def test_huge_integers_are_config_problems() -> None:
    with pytest.raises(ConfigError) as e:
        loader.parse("[vm]\ncpus = " + "1" * 5000, pathlib.Path("n.toml"))
    assert e.value.lines() == ["n.toml: a number has more than 4300 digits (numbers in a VM config have a few digits)"]
    hexa = "0x" + "f" * 5000
    with pytest.raises(ConfigError) as e:
        loader.parse(f"[vm]\nname = {hexa}\nmemory = {hexa}\ncpus = {hexa}\nargs = [{hexa}]", pathlib.Path("n.toml"))
    assert [p.path for p in e.value.problems] == ["vm.name", "vm.memory", "vm.cpus", "vm.args[0]"]
    assert all(len(line) < 200 for line in e.value.lines())


def test_messages_escape_what_a_terminal_would_act_on() -> None:
    text = '"\\u001b[31m" = 1\n[vm]\nname = "t\\u009b"\nmemory = "64M"\n"k\\u202e" = 1\nconsole = "\\ud83d\\ude00"'
    # (TOML has no surrogate escapes; the emoji is written as itself.)
    text = text.replace("\\ud83d\\ude00", "\U0001f600")
    with pytest.raises(ConfigError) as e:
        loader.parse(text, pathlib.Path("x.toml"))
    assert e.value.lines() == [
        'x.toml: "\\u001b[31m": unknown section (sections are [vm], [[iommufd]], [[vfio]], [[disk]] and [[net]])',
        'x.toml: vm.name: "t\\u009b" is not allowed here '
        "(start with a letter or digit; then letters, digits, '-', '.' and '_')",
        'x.toml: vm."k\\u202e": unknown key (known keys: ' + ", ".join(k.name for k in keytable.VM_KEYS) + ")",
        'x.toml: vm.console: "\\U0001f600" is not one of stdio, socket, none',
    ]
    assert all(line.isascii() and line.isprintable() for line in e.value.lines())


def test_shown_is_short_and_total() -> None:
    deep: list[object] = []
    for _ in range(5000):
        deep = [deep]
    assert len(quoting.shown(deep)) <= quoting.SHOWN_MAX
    assert quoting.shown(2**100_000).endswith("[...]")
    assert quoting.shown("x" * 1000) == '"' + "x" * 53 + '[...]"'
    assert quoting.shown({"a b": [1, True, 1.5, "\n"]}) == '{ "a b" = [1, true, 1.5, "\\n"] }'


def test_pci_addresses_on_the_command_line() -> None:
    assert parsers.pci_addresses(["01:00.0", "0000:0A:1f.7"]) == ["0000:01:00.0", "0000:0a:1f.7"]
    for bad in ("01:00.0\n", "01:00.8", "\u0661:00.0"):
        with pytest.raises(UsageError):
            parsers.pci_addresses([bad])


def test_config_file_size_cap(tmp_path: pathlib.Path) -> None:
    head = '[vm]\nname = "t"\nmemory = "64M"\n'
    path = tmp_path / "vm.toml"
    path.write_text(head + "#" * (config_files.MAX_BYTES - len(head) - 1) + "\n")
    assert loader.load(path).vm.name == "t"  # exactly the cap
    path.write_text(head + "#" * (config_files.MAX_BYTES - len(head)) + "\n")
    with pytest.raises(ConfigError, match="is larger than 1024 KiB"):
        loader.load(path)
    path.write_bytes(b"#" * (2 << 20))
    with pytest.raises(ConfigError, match="is larger than 1024 KiB"):
        loader.load(path)


def test_special_files_are_never_opened(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    link = tmp_path / "link.toml"
    link.symlink_to(fifo)
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "sock"))
    opened: list[str] = []
    real_open = os.open

    def spy(path: str | os.PathLike[str], flags: int, *args: int, **kwargs: Any) -> int:
        if not flags & os.O_PATH:  # an O_PATH descriptor only names the file, for fstat
            opened.append(str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", spy)
    for path, kind in ((fifo, "a FIFO"), (link, "a FIFO"), (tmp_path / "sock", "a socket"), (tmp_path, "a directory")):
        with pytest.raises(ConfigError) as e:
            loader.load(path)
        assert e.value.lines() == [f"{path}: is {kind} (a config is a regular TOML file)"]
    assert opened == []
    sock.close()


def test_a_file_swapped_after_the_stat_is_refused(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Between the stat and the open the path may be replaced: the fstat of what was opened decides.
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    regular = os.stat(__file__)
    real_stat = os.stat
    monkeypatch.setattr(os, "stat", lambda p, *a, **k: regular if str(p) == str(fifo) else real_stat(p, *a, **k))
    with pytest.raises(ConfigError) as e:
        loader.load(fifo)
    assert e.value.lines() == [f"{fifo}: is a FIFO (a config is a regular TOML file)"]
