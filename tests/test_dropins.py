"""Drop-ins: NAME.toml.d/*.toml merged over NAME.toml before validation, errors naming the
file that set the key, and every command seeing the merged config."""

from __future__ import annotations

import os
import pathlib

import pytest

from tests.conftest import plan_for
from vmrun import cli
from vmrun.base.errors import ConfigError
from vmrun.base.sizes import GiB
from vmrun.config import dropins, loader
from vmrun.plan import render

BASE = """\
[vm]
name = "w"
memory = "1G"
cpus = 2

[[iommufd]]
id = "iommufd0"

[[vfio]]
id = "gpu0"
host = "0000:01:00.0"
iommufd = "iommufd0"
props = { x-vga = true }

[[disk]]
id = "root"
path = "root.raw"
"""


def tree(tmp_path: pathlib.Path, dropins_: dict[str, str], base: str = BASE) -> pathlib.Path:
    path = tmp_path / "w.toml"
    path.write_text(base)
    d = tmp_path / "w.toml.d"
    d.mkdir()
    for name, text in dropins_.items():
        (d / name).write_text(text)
    return path


def test_merge_rules(tmp_path: pathlib.Path) -> None:
    path = tree(
        tmp_path,
        {
            # Lexical order: 20 comes after 10 and wins.
            "20-memory.toml": '[vm]\nmemory = "4G"\n',
            "10-memory.toml": '[vm]\nmemory = "2G"\nargs = ["-S"]\n',
            "30-gpu.toml": '[[vfio]]\nid = "nic0"\nhost = "02:00.0"\niommufd = "iommufd0"\n',
            # An existing id: that entry's keys change, nothing is appended.
            "40-root.toml": '[[disk]]\nid = "root"\nreadonly = true\n[[vfio]]\nid = "gpu0"\nprops = { rombar = 0 }\n',
            "50-args.toml": '[vm]\nargs = ["-no-reboot"]\n',
            "README": "not a drop-in",
            ".#60-x.toml": "not = [valid",
        },
    )
    cfg = loader.load(path)
    assert cfg.vm.memory == 4 * GiB and cfg.vm.cpus == 2
    assert [d.id for d in cfg.vfio] == ["gpu0", "nic0"]
    assert cfg.vfio[1].host == "0000:02:00.0"
    assert cfg.vfio[0].props == (("x-vga", True), ("rombar", 0))  # a table merges key by key
    assert [(d.id, d.readonly, d.path) for d in cfg.disk] == [("root", True, tmp_path / "root.raw")]
    assert cfg.vm.args == ("-no-reboot",)  # a plain array is a value: the last file's wins
    src = cfg.sources
    assert src.file_of("vm.memory") == str(tmp_path / "w.toml.d" / "20-memory.toml")
    assert src.file_of("vm.cpus") == str(path)
    assert src.file_of("vfio[1].host") == src.file_of("vfio[1]") == str(tmp_path / "w.toml.d" / "30-gpu.toml")
    assert src.set_by("vfio[0].props") == [str(path), str(tmp_path / "w.toml.d" / "40-root.toml")]
    assert src.set_by("vm.machine") == []


def test_errors_name_the_dropin_that_set_the_key(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tree(
        tmp_path,
        {
            "30-gpu.toml": '[[vfio]]\nid = "nic0"\nhost = "0000:zz:00.0"\n',
            "40-mem.toml": '[vm]\nmemory = "lots"\ninitrd = "i.img"\n',
        },
    )
    assert cli.main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.splitlines()
    d = tmp_path / "w.toml.d"
    assert f'{d}/30-gpu.toml: vfio[1].host: "0000:zz:00.0" is not a PCI address' in err[1]
    assert err[0].startswith(f"{d}/40-mem.toml: vm.memory: ")
    assert err[2].startswith(f"{d}/40-mem.toml: vm.initrd: needs vm.kernel")


def test_relative_paths_start_at_the_file_that_names_them(tmp_path: pathlib.Path) -> None:
    path = tree(tmp_path, {"10-disk.toml": '[[disk]]\nid = "data"\npath = "data.raw"\n'})
    cfg = loader.load(path)
    assert cfg.disk[0].path == tmp_path / "root.raw"
    assert cfg.disk[1].path == tmp_path / "w.toml.d" / "data.raw"


def test_syntax_errors_of_several_dropins_all_reported(tmp_path: pathlib.Path) -> None:
    path = tree(tmp_path, {"10-a.toml": "[vm\n", "20-b.toml": "x = \n"})
    with pytest.raises(ConfigError) as e:
        loader.load(path)
    lines = e.value.lines()
    assert lines[0].startswith(f"{tmp_path}/w.toml.d/10-a.toml: line 1, column 4: TOML syntax error")
    assert lines[1].startswith(f"{tmp_path}/w.toml.d/20-b.toml: line 1, column 5: TOML syntax error")


def test_a_dropin_directory_that_is_a_file_is_refused(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "w.toml"
    path.write_text(BASE)
    (tmp_path / "w.toml.d").write_text("")
    with pytest.raises(ConfigError, match=r"w\.toml\.d: is not a directory"):
        loader.load(path)


def test_an_empty_array_clears_a_section(tmp_path: pathlib.Path) -> None:
    path = tree(tmp_path, {"10-nodisk.toml": "disk = []\n"})
    cfg = loader.load(path)
    assert cfg.disk == ()
    # What the config wrote inside the replaced value is gone with it.
    assert cfg.sources.set_by("disk[0].path") == []
    assert cfg.sources.file_of("disk") == str(tmp_path / "w.toml.d" / "10-nodisk.toml")


def test_a_value_of_the_wrong_type_is_reported_at_the_dropin(tmp_path: pathlib.Path) -> None:
    path = tree(tmp_path, {"10-env.toml": '[vm]\nenv = { A = "1" }\n', "20-env.toml": "[vm]\nenv = 3\n"})
    with pytest.raises(ConfigError) as e:
        loader.load(path)
    assert e.value.lines() == [
        f"{tmp_path}/w.toml.d/20-env.toml: vm.env: expected a table of environment variables, "
        'e.g. { RUST_LOG = "info" }, got integer 3'
    ]


def test_plan_problems_name_the_dropin(tmp_path: pathlib.Path, standard_host: pathlib.Path) -> None:
    (tmp_path / "root.raw").write_bytes(b"\0" * 512)
    path = tree(tmp_path, {"30-gpu.toml": '[[vfio]]\nid = "nic0"\nhost = "0000:7f:00.0"\niommufd = "iommufd0"\n'})
    p = plan_for(path, standard_host)
    [problem] = [x for x in p.problems if x.path.startswith("vfio[1]")]
    assert problem.render(p.file_of(problem.path)).startswith(
        f"{tmp_path}/w.toml.d/30-gpu.toml: vfio[1].host: no PCI device 0000:7f:00.0"
    )


def test_plan_notes_name_the_dropin(tmp_path: pathlib.Path, standard_host: pathlib.Path) -> None:
    """`vmrun plan` names a drop-in for a note it caused, as for a problem; a note on the
    config's own key stays as it was (the plan's heading names the config)."""
    (tmp_path / "root.raw").write_bytes(b"\0" * 512)
    path = tree(tmp_path, {"40-spare.toml": '[[iommufd]]\nid = "spare0"\n'})
    text = render.text(plan_for(path, standard_host))
    notes = [line for line in text.splitlines() if line.startswith("# note:")]
    assert f"# note: {tmp_path}/w.toml.d/40-spare.toml: iommufd[1]: spare0 has no device" in "\n".join(notes)
    assert any(line.startswith("# note: vm.user: QEMU runs as root") for line in notes), notes
    data = render.to_json(plan_for(path, standard_host))
    assert any(n.startswith(f"{tmp_path}/w.toml.d/40-spare.toml: iommufd[1]:") for n in data["notes"]), data["notes"]


def test_dropin_directory_name() -> None:
    assert dropins.directory(pathlib.Path("a/b.toml")) == pathlib.Path("a/b.toml.d")


def test_every_command_sees_the_merged_config(
    tmp_path: pathlib.Path, standard_host: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "root.raw").write_bytes(b"\0" * 512)
    path = tree(
        tmp_path, {"10-mem.toml": '[vm]\nmemory = "2G"\n', "20-gpu.toml": '[[vfio]]\nid = "nic0"\nhost = "7f:00.0"\n'}
    )
    dropin = f"{tmp_path}/w.toml.d/20-gpu.toml"
    for command in (["plan"], ["run", "--dry-run"]):
        cli.main([*command, str(path), "--host-root", str(standard_host)])
        out = capsys.readouterr().out
        assert "  -m 2G \\\n" in out and f"# problem: {dropin}: vfio[1].host: no PCI device" in out, (command, out)
    cli.main(["check", str(path), "--host-root", str(standard_host)])
    out = capsys.readouterr().out
    assert f"fail  {dropin}: vfio[1].host  no PCI device 0000:7f:00.0" in out, out
    cli.main(["plan", "--json", str(path), "--host-root", str(standard_host)])
    out = capsys.readouterr().out
    assert '"-m",\n    "2G"' in out and f"{tmp_path}/w.toml.d/20-gpu.toml: vfio[1].host: no PCI device" in out


def test_a_dropin_others_could_write_is_refused(tmp_path: pathlib.Path) -> None:
    # vmrun runs as root: whoever can write a drop-in decides what it opens and as whom.
    path = tree(tmp_path, {"10-mem.toml": '[vm]\nmemory = "2G"\n'})
    dropin = tmp_path / "w.toml.d" / "10-mem.toml"
    dropin.chmod(0o666)
    with pytest.raises(ConfigError) as e:
        loader.load(path)
    owner = "uid 0 (root), group root" if os.geteuid() == 0 else f"uid {os.geteuid()}"
    assert e.value.lines()[0].startswith(f"{dropin}: is writable by every user (owner {owner}") and e.value.lines()[
        0
    ].endswith(f"mode 0666): whoever writes it steers what vmrun does as root (chmod o-w {dropin})")
    dropin.chmod(0o644)
    (tmp_path / "w.toml.d").chmod(0o777)
    with pytest.raises(ConfigError, match=r"w\.toml\.d: is writable by every user .*mode 0777"):
        loader.load(path)
    (tmp_path / "w.toml.d").chmod(0o755)
    if os.geteuid() != 0:
        return  # only root can give a file away
    os.chown(dropin, 4242, 4242)
    with pytest.raises(ConfigError, match=r"10-mem\.toml: is owned by uid 4242, not by root \(owner uid 4242"):
        loader.load(path)


def test_validate_names_the_dropins_it_merged(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tree(tmp_path, {"20-b.toml": "[vm]\ncpus = 3\n", "10-a.toml": '[vm]\nmemory = "2G"\n'})
    assert cli.main(["validate", str(path)]) == 0
    d = tmp_path / "w.toml.d"
    assert capsys.readouterr().out == f"{path}: ok (with {d}/10-a.toml, {d}/20-b.toml)\n"
