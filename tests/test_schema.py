"""`vmrun schema`: the JSON Schema made from the key tables accepts every config the project
ships and rejects what the parser rejects for a type or an unknown key."""

from __future__ import annotations

import json
import pathlib
import re
import tomllib
from typing import Any

import jsonschema
import pytest

from tests.conftest import REPO
from vmrun import cli
from vmrun.base.errors import ConfigError
from vmrun.config import keytable, loader, quoting
from vmrun.tools import schema

BAD = sorted((REPO / "tests" / "bad").glob("*.toml"))
SHIPPED = sorted(
    p
    for d in ("configs", "tests")
    for p in (REPO / d).rglob("*.toml")
    if "bad" not in p.relative_to(REPO).parts and not p.parent.name.endswith(".toml.d")
)
DROPINS = sorted(p for d in ("configs", "tests") for p in (REPO / d).rglob("*.toml.d/*.toml"))
# The parser's words for a value of the wrong type and for a key it does not know.
TYPE_OR_KEY = re.compile(r"unknown key|unknown section|^expected |, expected |^must be (a table|an array of tables)")


def validator(dropin: bool = False) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(schema.schema(dropin))


def test_the_schema_is_a_valid_2020_12_schema() -> None:
    jsonschema.Draft202012Validator.check_schema(schema.schema())
    jsonschema.Draft202012Validator.check_schema(schema.schema(dropin=True))


def test_every_key_of_every_section_is_described() -> None:
    props = schema.schema()["properties"]
    for section, keys in keytable.SECTION_KEYS.items():
        table = props[section]["items"] if keytable.SECTIONS[section] == "array" else props[section]
        assert table["additionalProperties"] is False
        for key in keys:
            assert table["properties"][key.name]["description"] == key.doc
            assert "type" in table["properties"][key.name], (section, key.name)


def test_the_configs_the_project_ships_are_valid() -> None:
    assert len(SHIPPED) >= 10
    for path in SHIPPED:
        with path.open("rb") as f:
            doc = tomllib.load(f)
        errors = [e.message for e in validator().iter_errors(doc)]
        assert not errors, f"{path.relative_to(REPO)}: {errors}"
    for path in DROPINS:
        with path.open("rb") as f:
            assert not list(validator(dropin=True).iter_errors(tomllib.load(f))), path


def key_path(parts: Any) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else quoting.key_part(part) if out else quoting.key_part(part)[1:]
    return out


@pytest.mark.parametrize("file", BAD, ids=[b.stem for b in BAD])
def test_the_schema_rejects_what_the_parser_rejects_for_type_or_key(file: pathlib.Path) -> None:
    try:
        doc = tomllib.loads(file.read_text())
    except (tomllib.TOMLDecodeError, RecursionError, ValueError):
        pytest.skip("not a TOML document: no editor schema applies")
    with pytest.raises(ConfigError) as e:
        loader.load(file)
    wanted = [p for p in e.value.problems if TYPE_OR_KEY.search(p.message)]
    try:
        at = [key_path(err.absolute_path) for err in validator().iter_errors(doc)]
    except ValueError:
        pytest.skip("an integer past Python's digit limit: jsonschema cannot compare it (the parser reports it)")
    # Each such problem has a schema error at its key, or at the table that must not have it.
    for problem in wanted:
        path = problem.path if problem.message != "unknown section" else ""
        assert any(path == p or (p and path.startswith((f"{p}.", f"{p}["))) for p in at), (problem, at)


def test_a_wrong_type_an_unknown_key_and_a_bad_enum_are_each_schema_errors() -> None:
    doc = {"vm": {"name": "a", "memory": 1024, "memroy": "1G", "accel": "hvf"}, "vfio": [{"id": "g", "hots": "x"}]}
    messages = sorted(e.message for e in validator().iter_errors(doc))
    assert any("1024 is not of type 'string'" in m for m in messages), messages
    assert any("'memroy' was unexpected" in m for m in messages), messages
    assert any("'hvf' is not one of ['kvm', 'tcg']" in m for m in messages), messages
    assert any("'hots' was unexpected" in m for m in messages), messages


def test_cli_prints_the_schema(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["schema"]) == 0
    assert json.loads(capsys.readouterr().out) == schema.schema()
    assert cli.main(["schema", "--dropin"]) == 0
    assert "required" not in json.loads(capsys.readouterr().out)["properties"]["vfio"]["items"]


def test_each_default_and_choice_has_one_home() -> None:
    """A key's choices live in its parser and its default in the model; the docs (schema,
    messages) are made from them, never written beside them."""
    for name, keys in keytable.SECTION_KEYS.items():
        model = keytable.SECTION_MODELS[name]
        for key in keys:
            assert "default" not in key.what, f"{name}.{key.name} restates its default: {key.what!r}"
            default = key.default(model)
            if default is not None and key.default_text is None:
                assert (
                    f"{keytable.words(default)} (default" in key.doc
                    or f"(default {keytable.words(default)})" in key.doc
                )
            assert all(choice in key.doc for choice in key.choices()), key.doc
