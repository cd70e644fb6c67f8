"""`vmrun schema`: a JSON Schema (draft 2020-12) of the config, for editors (taplo, VS Code).

Made from the key tables that drive parsing (config.SECTION_KEYS, each parser's Traits),
so a key the parser knows is in the schema with its type, values and doc, and no other.
Rules between keys (exactly one of host, sysfsdev, fd; ids that must exist) stay with
`vmrun validate`: a schema says what each key may hold.
"""

from __future__ import annotations

import json
from typing import Any

from vmrun.config import keytable, parsers

DRAFT = "https://json-schema.org/draft/2020-12/schema"


def key_schema(key: keytable.Key, model: type) -> dict[str, Any]:
    # A parser without Traits gives a key of any type (tests/test_schema.py fails on it:
    # register one with parsers.described).
    traits = parsers.TRAITS.get(key.parse)
    default = key.default(model)
    schema = {**(traits.schema if traits else {}), "description": key.doc}
    return schema if default is None else {**schema, "default": default}


def table_schema(keys: tuple[keytable.Key, ...], model: type, what: str, required: bool) -> dict[str, Any]:
    out: dict[str, Any] = {
        "type": "object",
        "description": what,
        "properties": {k.name: key_schema(k, model) for k in keys},
        "additionalProperties": False,
    }
    needed = [k.name for k in keys if k.required]
    if needed and required:
        out["required"] = needed
    return out


SECTION_DOCS = {
    "vm": "the VM: name, memory, CPUs, machine, identity, boot",
    "iommufd": "an iommufd object, shared by the devices that name its id",
    "vfio": "a device passed through with VFIO",
    "disk": "a disk image, opened by vmrun and passed as an fd",
    "net": "a network device",
}


def schema(dropin: bool = False) -> dict[str, Any]:
    """The schema of a config; with `dropin`, of a drop-in (NAME.toml.d/*.toml), where
    no key is required because the files are merged first."""
    properties: dict[str, Any] = {}
    for name, kind in keytable.SECTIONS.items():
        doc = SECTION_DOCS.get(name, name)
        # A drop-in's entry may name an existing entry's id and change only some of its keys.
        table = table_schema(keytable.SECTION_KEYS[name], keytable.SECTION_MODELS[name], doc, required=not dropin)
        if kind == "array":
            properties[name] = {"type": "array", "description": f"[[{name}]]: {doc}", "items": table}
        else:
            properties[name] = table
    out: dict[str, Any] = {
        "$schema": DRAFT,
        "title": "vmrun drop-in (NAME.toml.d/*.toml)" if dropin else "vmrun VM config",
        "description": "A VM for vmrun, the declarative QEMU launcher. "
        "Cross-key rules are checked by `vmrun validate`.",
        "type": "object",
        "properties": properties,
        "additionalProperties": False,
    }
    if not dropin:
        out["required"] = ["vm"]
    return out


def text(dropin: bool = False) -> str:
    return json.dumps(schema(dropin), indent=2) + "\n"
