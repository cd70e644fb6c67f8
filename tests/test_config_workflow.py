"""The issue's "done when", on a fake host: init a config for a device, split it into a base
and a drop-in, see the merge with show, check both files with the editor schema, and
import a QEMU command line; smoke -j is exercised on real QEMU in tests/test_smoke.py."""

from __future__ import annotations

import json
import pathlib
import tomllib

import jsonschema
import pytest

from tests.conftest import plan_for
from vmrun import cli


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    status = cli.main(list(args))
    out = capsys.readouterr()
    return status, out.out, out.err


def test_init_split_show_schema_import(
    tmp_path: pathlib.Path, standard_host: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = tmp_path / "gpu.toml"
    status, _, err = run(capsys, "init", "gpu", "-d", "05:00.0", "-o", str(base), "--host-root", str(standard_host))
    assert status == 0 and f"wrote {base}" in err and "0000:05:00.1 is bound to snd_hda_intel" in err
    # Split: the memory and one more device go to a drop-in.
    dropins = tmp_path / "gpu.toml.d"
    dropins.mkdir()
    (dropins / "10-memory.toml").write_text('[vm]\nmemory = "16G"\n')
    (dropins / "20-nic.toml").write_text('[[vfio]]\nid = "nic0"\nhost = "0000:02:00.0"\niommufd = "iommufd0"\n')
    status, out, _ = run(capsys, "show", str(base))
    rows = {line.split()[0]: line.split()[-1] for line in out.splitlines()[1:]}
    assert rows["vm.memory"] == str(dropins / "10-memory.toml") and rows["vm.user"] == str(base)
    assert rows["vfio[2].host"] == str(dropins / "20-nic.toml") and rows["vm.machine"] == "(default)"
    p = plan_for(base, standard_host)
    # 05:00.1 is still on its host driver (`vmrun prepare` binds it), which leaves 05:00.0's group unviable.
    assert {x.path for x in p.problems if x.path.startswith("vfio")} == {"vfio[0]", "vfio[1]"}
    assert "-m" in p.argv and p.argv[p.argv.index("-m") + 1] == "16G"

    full = json.loads(run(capsys, "schema")[1])
    dropin_schema = json.loads(run(capsys, "schema", "--dropin")[1])
    jsonschema.validate(tomllib.loads(base.read_text()), full)
    for f in dropins.iterdir():
        jsonschema.validate(tomllib.loads(f.read_text()), dropin_schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"vm": {"memroy": "1G"}}, dropin_schema)

    imported = tmp_path / "old.toml"
    argv = ["qemu-system-x86_64", "-m", "1G", "-device", "vfio-pci,host=0000:03:00.0,id=dev0", "-snapshot"]
    status, _, err = run(capsys, "import", "--name", "old", "-o", str(imported), "--", *argv)
    assert status == 0 and err == f"vmrun import: wrote {imported} (drop-ins go in {imported}.d/)\n"
    doc = tomllib.loads(imported.read_text())
    assert doc["vfio"] == [{"id": "dev0", "host": "0000:03:00.0"}] and doc["vm"]["args"] == ["-snapshot"]
    assert run(capsys, "validate", str(base), str(imported))[0] == 0
