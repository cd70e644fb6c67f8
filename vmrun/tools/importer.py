"""`vmrun import`: a config from a QEMU command line (tools/import_argv.py) or a libvirt
domain's XML (tools/import_domain.py), checked as any config before it is written."""

from __future__ import annotations

import pathlib
from collections.abc import Mapping

from vmrun.base.errors import ConfigError, UsageError
from vmrun.base.problems import key_path_parents
from vmrun.host import facts as host
from vmrun.qemu.cmdline import FdInfo
from vmrun.tools.import_argv import Importer
from vmrun.tools.imported import Imported


def import_argv(
    argv: list[str],
    fds: Mapping[int, FdInfo] | None = None,
    host_view: host.Host | None = None,
    name: str | None = None,
) -> Imported:
    importer = Importer(list(argv), fds or {}, host_view or host.Host("/"), name)
    doc = importer.run()
    return Imported(
        doc,
        tuple((why, tuple(tokens)) for why, tokens in importer.args),
        tuple((why, tuple(tokens)) for why, tokens in importer.dropped),
        tuple(importer.origins.items()),
    )


def checked(imported: Imported, source: str, output: str | None) -> str:
    """The config's text, after the checks every config gets. A problem is blamed on the
    option or element it came from, not on the file import would have written."""
    from vmrun.config import loader

    text = imported.text(source)
    try:
        loader.parse(text, pathlib.Path(output or "imported.toml"))
    except ConfigError as e:
        origins = dict(imported.origins)
        lines = []
        for problem in e.problems:
            origin = next((origins[p] for p in key_path_parents(problem.path) if p in origins), None)
            where = f"{origin} (as {problem.path})" if origin else problem.path
            hint = f" ({problem.hint})" if problem.hint else ""
            lines.append(f"{source}: {where}: {problem.message}{hint}; vmrun import cannot map it")
        raise UsageError("\n".join(lines)) from None
    return text


def config_text(
    argv: list[str],
    pid: int | None,
    host_root: str,
    name: str | None,
    output: str | None,
    domain_xml: str | None = None,
) -> str:
    """`vmrun import`: the config, checked as any config, for a QEMU command line (`argv`),
    the running QEMU `pid` on the host under `host_root`, or a libvirt domain's XML (a file,
    `-` for stdin)."""
    from vmrun.host import process

    if sum((bool(argv), pid is not None, domain_xml is not None)) != 1:
        raise UsageError("give a QEMU command line after --, --pid PID or --from-libvirt DOMAIN.xml (one of them)")
    if domain_xml is not None:
        from vmrun.tools import import_domain

        imported, source = import_domain.from_file(domain_xml, name)
        return checked(imported, source, output)
    view = host.Host(host_root)
    fds = None
    user = None
    source = "the command line"
    if pid is not None:
        try:
            argv, fds, user = process.from_pid(pid, view)
        except OSError as e:
            raise UsageError(f"cannot read process {pid}: {e.strerror}") from None
        source = f"process {pid}"
    imported = import_argv(argv, fds, view, name)
    if user is not None:
        imported.doc["vm"]["user"] = user
    return checked(imported, source, output)
