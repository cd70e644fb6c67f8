"""`vmrun show`: the merged config with defaults, as text (with who set each value), TOML
that loads to the same VM, and JSON."""

from __future__ import annotations

import json
import pathlib

import attrs
import pytest

from tests.conftest import REPO
from tests.test_dropins import BASE, tree
from vmrun import cli
from vmrun.config import loader
from vmrun.tools import show

CONFIGS = sorted(p for d in ("configs", "tests/golden", "tests/smoke") for p in (REPO / d).glob("*.toml"))


@pytest.mark.parametrize("file", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_the_toml_form_is_a_config_of_the_same_vm(file: pathlib.Path, tmp_path: pathlib.Path) -> None:
    cfg = loader.load(file)
    again = loader.parse(show.toml_text(cfg), tmp_path / "shown.toml")
    assert attrs.evolve(again, file=cfg.file) == cfg


def test_text_names_the_file_that_set_each_value(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tree(tmp_path, {"10-mem.toml": '[vm]\nmemory = "2G"\nenv = { A = "1" }\n'}, BASE)
    assert cli.main(["show", str(path)]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert rows["vm.memory"].split() == ["vm.memory", '"2G"', f"{tmp_path}/w.toml.d/10-mem.toml"]
    assert rows["vm.cpus"].split() == ["vm.cpus", "2", str(path)]
    assert rows["vm.machine"].split() == ["vm.machine", '"q35"', "(default)"]
    assert rows["vfio[0].props"].split()[-1] == str(path)
    assert "vm.user" not in rows  # unset: QEMU runs as the caller


def test_json_and_toml_forms(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tree(tmp_path, {"10-mem.toml": '[vm]\nmemory = "2G"\n'}, BASE)
    assert cli.main(["show", "--json", str(path)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["vm"]["memory"] == "2G" and doc["vm"]["user"] is None and doc["vm"]["memlock"] == "auto"
    assert doc["disk"][0]["path"] == str(tmp_path / "root.raw")
    assert cli.main(["show", "--toml", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"# {path} with {tmp_path}/w.toml.d/10-mem.toml, defaults filled in\n")
    assert '\n[vm]\nname = "w"\nmemory = "2G"\ncpus = 2\n' in out


def test_a_bad_config_exits_2(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tree(tmp_path, {"10-mem.toml": "[vm]\nmemory = 3\n"}, BASE)
    assert cli.main(["show", str(path)]) == 2
    assert capsys.readouterr().err.startswith(f"{tmp_path}/w.toml.d/10-mem.toml: vm.memory: expected a size")
