"""`vmrun import`: QEMU command lines to configs. The golden configs' planned command lines
come back as configs that plan the same command line, fd numbers aside."""

from __future__ import annotations

import json
import pathlib
import re
import tomllib

import pytest

from tests.conftest import REPO, plan_for
from tests.test_lifecycle import Running
from vmrun import cli
from vmrun.config import loader
from vmrun.host import facts as host
from vmrun.plan.planner import Plan
from vmrun.qemu import cmdline as qemu_cmdline
from vmrun.tools import importer

GOLDEN = sorted((REPO / "tests" / "golden").glob("*.toml"))
FD_RE = re.compile(r"(?<=fd=)[0-9]+|(?<=/proc/self/fd/)[0-9]+|(?<=/dev/fdset/)[0-9]+|(?<=set=)[0-9]+")


def without_fds(argv: list[str]) -> list[str]:
    return [FD_RE.sub("N", a) for a in argv]


def fd_infos(p: Plan) -> dict[int, qemu_cmdline.FdInfo]:
    """What each fd of a plan is open on, as /proc/PID/fd would show it once QEMU runs."""
    return {f.fd: qemu_cmdline.FdInfo(f.path if f.kind != "inherited" else None, f.ifname) for f in p.fds}


@pytest.fixture(params=GOLDEN, ids=[g.stem for g in GOLDEN])
def golden_plan(
    request: pytest.FixtureRequest,
    standard_host: pathlib.Path,
    gpu_host: pathlib.Path,
    narrow_host: pathlib.Path,
    monkeypatch: pytest.MonkeyPatch,
) -> tuple[pathlib.Path, pathlib.Path, Plan]:
    """A golden config, the fake host it was made for, and its plan there."""
    golden: pathlib.Path = request.param
    monkeypatch.setenv("VMRUN_DATA_DIR", "/var/lib/vmrun")
    # The GPU goldens on the host they were made for: their BARs decide the window and phys-bits.
    root = {"gpu": gpu_host, "narrow": narrow_host}.get(golden.stem.split("-", 1)[0], standard_host)
    return golden, root, plan_for(golden, root)


def test_import_of_a_planned_command_line_plans_the_same(
    golden_plan: tuple[pathlib.Path, pathlib.Path, Plan], tmp_path: pathlib.Path
) -> None:
    golden, root, before = golden_plan
    imported = importer.import_argv(before.argv, fd_infos(before), host.Host(root))
    path = tmp_path / f"{golden.stem}.toml"
    path.write_text(imported.text(str(golden.name)))
    after = plan_for(path, root)
    assert without_fds(after.argv) == without_fds(before.argv), path.read_text()
    assert [f.path for f in after.fds if f.kind != "inherited"] == [f.path for f in before.fds if f.kind != "inherited"]


def json_value(value: str) -> object:
    """A key=value property as libvirt's JSON writes it: numbers and booleans typed."""
    if value in ("on", "off"):
        return value == "on"
    return int(value) if re.fullmatch(r"-?[1-9][0-9]*|0", value) else value


def in_json_syntax(argv: list[str]) -> list[str]:
    """`argv` with every -device/-object/-blockdev/-netdev/-chardev value in QEMU's JSON
    syntax, as libvirt writes them: the bare first key under its name, dotted keys nested,
    a repeated key (hostfwd) as a list of QAPI strings."""
    out = list(argv)
    for i, arg in enumerate(argv[:-1]):
        if arg not in ("-device", "-object", "-blockdev", "-netdev", "-chardev"):
            continue
        props = qemu_cmdline.keyvals(argv[i + 1])
        data: dict[str, object] = {}
        implied = qemu_cmdline.IMPLIED_KEY.get(arg)
        if implied is not None and props and props[0][1] is None:
            data[implied] = props.pop(0)[0]
        for key, value in props:
            assert value is not None, (arg, argv[i + 1])
            *parents, leaf = key.split(".")
            table = data
            for parent in parents:
                table = table.setdefault(parent, {})  # type: ignore[assignment]
            if leaf in table:
                previous = table[leaf]
                table[leaf] = [*(previous if isinstance(previous, list) else [previous]), {"str": value}]
                if not isinstance(previous, list):
                    table[leaf][0] = {"str": previous}  # type: ignore[index]
            else:
                table[leaf] = value if leaf == "id" else json_value(value)
        out[i + 1] = json.dumps(data, separators=(",", ":"))
    return out


def test_both_option_syntaxes_import_to_the_same_config(golden_plan: tuple[pathlib.Path, pathlib.Path, Plan]) -> None:
    """Every mapping of a golden's command line holds for libvirt's JSON syntax too."""
    _, root, planned = golden_plan
    json_argv = in_json_syntax(planned.argv)
    assert json_argv != planned.argv
    keyval = importer.import_argv(planned.argv, fd_infos(planned), host.Host(root))
    json_form = importer.import_argv(json_argv, fd_infos(planned), host.Host(root))
    assert json_form.doc["vm"].pop("args", []) == in_json_syntax(keyval.doc["vm"].pop("args", []))
    assert json_form.doc == keyval.doc


def test_a_hand_written_command_line(tmp_path: pathlib.Path, standard_host: pathlib.Path) -> None:
    argv = [
        "/usr/bin/qemu-system-x86_64",
        "-name",
        "legacy-box",
        "-enable-kvm",
        "-M",
        "q35,usb=on",
        "-m",
        "2048",
        "-smp",
        "cpus=2",
        "-cpu",
        "host,+invtsc",
        "-drive",
        f"file={tmp_path}/root.qcow2,format=qcow2,if=virtio",
        "-netdev",
        "user,id=n0,hostfwd=tcp::2222-:22",
        "-device",
        "virtio-net-pci,netdev=n0,id=n0",
        "-netdev",
        "tap,id=t0,ifname=tap0,script=no,downscript=no",
        "-device",
        "e1000e,netdev=t0,mac=52:54:00:00:00:01",
        "-device",
        "vfio-pci,host=01:00.0,x-vga=on,rombar=0",
        "-bios",
        "/usr/share/ovmf/OVMF.fd",
        "-nographic",
        "-overcommit",
        "mem-lock=off",
        "-no-reboot",
    ]
    imported = importer.import_argv(argv, host_view=host.Host(standard_host))
    text = imported.text("a shell script")
    doc = tomllib.loads(text)
    assert doc["vm"] == {
        "name": "legacy-box",
        "memory": "2G",
        "accel": "kvm",
        "machine": "q35",
        "firmware": "uefi",
        "cpus": 2,
        "hotplug_slots": 0,
        "args": ["-cpu", "host,+invtsc", "-overcommit", "mem-lock=off", "-no-reboot", "-machine", "usb=on"],
    }
    assert doc["disk"] == [{"id": "disk0", "path": f"{tmp_path}/root.qcow2", "format": "qcow2"}]
    assert doc["net"] == [
        {"id": "n0", "forwards": ["tcp:0.0.0.0:2222:22"]},
        {"id": "t0", "type": "tap", "ifname": "tap0", "mac": "52:54:00:00:00:01", "model": "e1000e"},
    ]
    assert doc["vfio"] == [{"id": "hostdev0", "host": "01:00.0", "props": {"x-vga": True, "rombar": 0}}]
    # One comment per option kept as is.
    assert "    # -overcommit mem-lock=off: not modelled by vmrun: kept as is\n" in text
    assert "    # -machine usb=on: machine properties vmrun does not model\n" in text
    assert "    # -cpu host,+invtsc: CPU features vmrun does not model\n" in text
    loader.parse(text, tmp_path / "x.toml")


def test_cli_reads_args_after_the_separator_and_writes_a_file(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "vm.toml"
    args = ["import", "--name", "n1", "--output", str(out), "--", "qemu-system-x86_64", "-m", "1G", "-S"]
    assert cli.main(args) == 0
    assert capsys.readouterr().err == f"vmrun import: wrote {out} (drop-ins go in {out}.d/)\n"
    doc = tomllib.loads(out.read_text())
    assert doc["vm"] == {"name": "n1", "memory": "1G", "console": "none", "hotplug_slots": 0, "args": ["-S"]}
    assert cli.main(args) == 2
    assert "exists: vmrun import does not overwrite it without --force" in capsys.readouterr().err


def test_cli_reads_a_running_qemu_by_pid(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    proc = tmp_path / "proc" / "4242"
    (proc / "fd").mkdir(parents=True)
    (proc / "fdinfo").mkdir()
    (proc / "cmdline").write_bytes(b"\0".join([b"qemu-system-x86_64", b"-name", b"guest=p1", b"-m", b"512M", b""]))
    (proc / "status").write_text("Name:\tqemu\nUid:\t0\t0\t0\t0\n")
    assert cli.main(["import", "--pid", "4242", "--host-root", str(tmp_path)]) == 0
    doc = tomllib.loads(capsys.readouterr().out)
    assert doc["vm"] == {"name": "p1", "memory": "512M", "console": "none", "hotplug_slots": 0}


def test_cli_wants_a_command_line_or_a_pid(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["import"]) == 2
    assert "give a QEMU command line after --, --pid PID or --from-libvirt" in capsys.readouterr().err


@pytest.mark.qemu
def test_import_of_a_running_qemu(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A VM vmrun launched (UEFI from fd sets, the QMP socket and lock as fds): what /proc
    # shows of it imports to the config it came from.
    source = tmp_path / "uefi.toml"
    source.write_text((REPO / "tests" / "smoke" / "uefi.toml").read_text())
    vm = Running(source, "smoke-uefi", "--paused")
    try:
        vm.wait_running()
        out = tmp_path / "imported.toml"
        assert cli.main(["import", "--pid", str(vm.pid), "--output", str(out)]) == 0
    finally:
        vm.end()
    capsys.readouterr()
    assert cli.main(["plan", "--json", str(out)]) == 0
    imported = json.loads(capsys.readouterr().out)["argv"]
    assert cli.main(["plan", "--json", str(source)]) == 0
    planned = json.loads(capsys.readouterr().out)["argv"]
    assert without_fds(imported) == [*without_fds(planned), "-S"]


def test_what_a_process_shows_is_imported_as_data(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`--pid` of a QEMU another user controls: its argv may hold a newline that ends the
    comment vmrun writes, and would add an argument of its own (`-sandbox off`) that looks
    like a separate option. What loads back is exactly the argv read, nothing more."""
    planted = 'mem-lock=off\n    "-sandbox", "off",\n    #'
    argv = ["qemu-system-x86_64", "-m", "512M", "-overcommit", planted, "-msg", "\x1b]0;pwned\x07"]
    proc = tmp_path / "proc" / "4242"
    (proc / "fd").mkdir(parents=True)
    (proc / "fdinfo").mkdir()
    (proc / "cmdline").write_bytes(b"\0".join(a.encode() for a in [*argv, ""]))
    (proc / "status").write_text("Name:\tqemu\nUid:\t0\t0\t0\t0\n")
    assert cli.main(["import", "--pid", "4242", "--host-root", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert tomllib.loads(text)["vm"]["args"] == argv[3:]
    assert '    "-sandbox", "off",\n' not in text and "\x1b" not in text
    assert '    # -overcommit "mem-lock=off\\n    \\"-sandbox\\", \\"off\\",\\n    #": not modelled' in text


def test_hotplug_reservations_import_to_the_key() -> None:
    """vmrun's root ports with a prefetchable reservation import to hotplug_reserve."""
    argv = ["qemu-system-x86_64", "-machine", "q35", "-m", "4G"]
    for k in range(2):
        argv += ["-device", f"pcie-root-port,id=hotplug{k},chassis={255 - k},pref64-reserve=64G,mem-reserve=64M"]
    doc = tomllib.loads(importer.import_argv(argv).text("the command line"))
    assert doc["vm"]["hotplug_slots"] == 2 and doc["vm"]["hotplug_reserve"] == "64G"
    assert "args" not in doc["vm"]
