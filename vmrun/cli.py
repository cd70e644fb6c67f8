"""The `vmrun` command: validate, plan and run VM configs.

Exit status: 0 success; 1 the host cannot do what the config asks, or the launch failed;
2 bad input (config errors, wrong command line). Errors never show a traceback.

`vmrun run` must start fast (benchmarks/launch.py): this module imports the error types
only, each command imports what it needs when it runs, only the sub-parser of the command
given is built, and a plain `vmrun run` is read without argparse at all.
tests/test_lean_launch.py keeps it so.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Callable, Sequence

from vmrun import __version__
from vmrun.base.errors import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    BadName,
    ConfigError,
    LaunchError,
    UsageError,
    VmError,
)

TYPE_CHECKING = False  # as in host/reader.py: typing itself costs a launch 15 ms

if TYPE_CHECKING:
    import argparse

    Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]
    AddParser = Callable[[Subparsers, str], None]
    Handler = Callable[[argparse.Namespace], int]


def add_host_root(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--host-root",
        metavar="DIR",
        default="/",
        help="read sysfs and /dev under DIR instead of / (for tests and inspection)",
    )


def parser(only: str | None = None) -> argparse.ArgumentParser:
    """The command line: every command's sub-parser, or only the one named `only` (building
    them all takes longer than some commands run)."""
    import argparse

    top = argparse.ArgumentParser(
        prog="vmrun",
        description="Declarative QEMU launcher for VFIO passthrough with iommufd and fd passing.",
        epilog="exit status: 0 ok, 1 host or launch failure, 2 bad config or usage",
    )
    top.add_argument("--version", action="version", version=f"vmrun {__version__}")
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (add, _) in COMMANDS.items():
        if only is None or only == name:
            add(sub, name)
    return top


def add_validate(sub: Subparsers, name: str) -> None:
    p = sub.add_parser(
        name,
        help="check config files; print every problem",
        description="Check config files without looking at the host.",
    )
    p.add_argument("files", nargs="+", metavar="FILE")


def add_plan(sub: Subparsers, name: str) -> None:
    p = sub.add_parser(
        name,
        help="print what `run` would do",
        description="Print the command line, fds, memlock and identity of a launch.",
    )
    p.add_argument("file", metavar="FILE")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    add_host_root(p)


def add_init(sub: Subparsers, name: str) -> None:
    p = sub.add_parser(
        name,
        help="write a first config for some of the host's PCI devices",
        description="Write a config for the named PCI devices with every endpoint of their IOMMU groups, "
        "one shared iommufd object (--legacy: the legacy VFIO container), default memory and CPUs, and "
        "QEMU as nobody. Devices still on a host driver are written and named; `vmrun prepare` binds them.",
    )
    p.add_argument("name", metavar="VMNAME", help="the VM's name (vm.name)")
    p.add_argument(
        "--device",
        "-d",
        dest="devices",
        metavar="ADDR",
        nargs="+",
        action="extend",
        required=True,
        help="a PCI address as `vmrun devices` shows it",
    )
    p.add_argument("--legacy", action="store_true", help="the legacy VFIO container instead of iommufd")
    add_output(p)
    add_host_root(p)


def add_import(sub: Subparsers, name: str) -> None:
    import argparse

    p = sub.add_parser(
        name,
        help="write a config from a QEMU command line, a running QEMU or a libvirt domain",
        description="Write a config from a QEMU command line (after --), from the command line and fds of a "
        "running QEMU (--pid), or from a libvirt domain's XML (--from-libvirt). What vmrun models is mapped to "
        "its keys; every other option is kept in vm.args with a comment, and what vmrun supplies itself is "
        "dropped with one.",
    )
    p.add_argument("--name", metavar="VMNAME", help="the VM's name (default: from -name)")
    p.add_argument("--pid", type=int, metavar="PID", help="read /proc/PID/cmdline and /proc/PID/fd of a running QEMU")
    p.add_argument(
        "--from-libvirt",
        metavar="DOMAIN.xml",
        help="read a libvirt domain's XML (- for stdin: virsh dumpxml NAME | vmrun import --from-libvirt -)",
    )
    add_output(p)
    add_host_root(p)
    p.add_argument("qemu_args", nargs=argparse.REMAINDER, metavar="-- QEMU ARGS")


def add_show(sub: Subparsers, name: str) -> None:
    p = sub.add_parser(
        name,
        help="print the config as `run` uses it: drop-ins merged, defaults filled in",
        description="Print a config with its drop-ins (FILE.d/*.toml) merged and every default filled in; "
        "the text form says which file set each value.",
    )
    p.add_argument("file", metavar="FILE")
    form = p.add_mutually_exclusive_group()
    form.add_argument("--json", action="store_true", help="print JSON (unset keys are null)")
    form.add_argument("--toml", action="store_true", help="print TOML, itself a config for the same VM")


def add_schema(sub: Subparsers, name: str) -> None:
    p = sub.add_parser(
        name,
        help="print a JSON Schema of the config for editors",
        description="Print a JSON Schema (draft 2020-12) of the config, made from the tables vmrun parses with, "
        "for taplo, VS Code (Even Better TOML) and other editors.",
    )
    p.add_argument("--dropin", action="store_true", help="the schema of a drop-in: no key is required")


def add_check(sub: Subparsers, name: str) -> None:
    p = sub.add_parser(
        name,
        help="preflight: is this host ready for the config?",
        description="Check the host for a config: QEMU, /dev/iommu, devices and their IOMMU groups, "
        "memlock, the run-as user. Exit status 0 when the VM can launch, 1 otherwise.",
    )
    p.add_argument("file", metavar="FILE")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    add_host_root(p)


def add_devices(sub: Subparsers, name: str) -> None:
    p = sub.add_parser(
        name,
        help="list the host's PCI devices",
        description="List PCI devices with their driver, IOMMU group and VFIO cdev.",
    )
    p.add_argument("addresses", nargs="*", metavar="ADDR", help="only these devices")
    p.add_argument("--group", metavar="N", help="only the devices of IOMMU group N")
    p.add_argument("--json", action="store_true", help="print JSON")
    add_host_root(p)


def add_bind(sub: Subparsers, name: str) -> None:
    text = {
        "bind": "bind devices to vfio-pci, remembering their driver",
        "unbind": "give devices back to the driver they had before `vmrun bind`",
    }[name]
    p = sub.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
    p.add_argument("addresses", nargs="+", metavar="ADDR")
    add_host_root(p)


def add_prepare(sub: Subparsers, name: str) -> None:
    p = sub.add_parser(
        name,
        help="bind every PCI device of a config to vfio-pci",
        description="Bind every PCI device that a config names to vfio-pci.",
    )
    p.add_argument("file", metavar="FILE")
    add_host_root(p)


def add_run(sub: Subparsers, name: str) -> None:
    p = sub.add_parser(
        name,
        help="launch QEMU as the config says",
        description="Open the devices, set limits, drop privileges and exec QEMU.",
    )
    p.add_argument("file", metavar="FILE")
    p.add_argument("--dry-run", action="store_true", help="print the plan and stop")
    p.add_argument(
        "--paused",
        action="store_true",
        help="start with the guest's CPUs stopped (QEMU -S); `vmrun qmp NAME cont` starts them",
    )
    add_host_root(p)


def add_output(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", "-o", metavar="FILE", help="write the config to FILE (default: stdout)")
    p.add_argument("--force", action="store_true", help="overwrite FILE if it exists")


def positive(text: str) -> int:
    import argparse

    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number above 0")
    return int(text)


def seconds(text: str) -> float:
    import argparse

    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds above 0")
    return value


STOP_TIMEOUT = 30.0
UPGRADE_TIMEOUT = 60.0
DETACH_TIMEOUT = 30.0  # hotplug.DETACH_TIMEOUT: not imported, `run` must start fast
SMOKE_TIMEOUT = 60.0  # a TCG boot to a console line fits; KVM needs far less


def add_ps(sub: Subparsers, name: str) -> None:
    p = sub.add_parser(
        name,
        help="list the running VMs",
        description="List the VMs running under the state directory: name, QEMU's pid and user, uptime, "
        "resident memory, devices.",
    )
    p.add_argument("-a", "--all", action="store_true", help="also list stopped VMs that left a state directory")
    p.add_argument("-q", "--quiet", action="store_true", help="print only the names")
    p.add_argument("--json", action="store_true", help="print JSON")


def add_status(sub: Subparsers, name: str) -> None:
    p = sub.add_parser(
        name,
        help="show one VM's run state and process",
        description="Show a running VM's state as QEMU reports it (QMP query-status: running, paused, ...) "
        "and its process: pid, user, uptime, memory, CPU.",
    )
    p.add_argument("name", metavar="NAME")
    p.add_argument("--json", action="store_true", help="print JSON")


def add_stop(sub: Subparsers, name: str) -> None:
    p = sub.add_parser(
        name,
        help="shut a VM down: ACPI powerdown, then QMP quit, SIGTERM, SIGKILL",
        description="Press the guest's ACPI power button and wait; if the VM is still there, ask QEMU to quit "
        "over QMP, then send SIGTERM, then SIGKILL. Each step is printed as it happens. "
        "Exit status 0 once the VM is gone, 1 when it is not running or cannot be stopped.",
    )
    p.add_argument("name", metavar="NAME")
    p.add_argument(
        "--timeout",
        type=seconds,
        default=STOP_TIMEOUT,
        metavar="S",
        help=f"seconds until SIGKILL (default {STOP_TIMEOUT:g}): 2/3 for the guest's shutdown, "
        "1/6 each for quit and SIGTERM",
    )


def add_qmp(sub: Subparsers, name: str) -> None:
    p = sub.add_parser(
        name,
        help="run a QMP command on a VM and print the result",
        description="Run one QMP command on a running VM and print QEMU's answer as JSON, "
        'e.g. `vmrun qmp NAME query-status` or `vmrun qmp NAME qom-list \'{"path": "/objects"}\'`.',
    )
    p.add_argument("name", metavar="NAME")
    p.add_argument("qmp_command", metavar="CMD")
    p.add_argument("qmp_args", metavar="ARGS-JSON", nargs="?", help="the command's arguments as a JSON object")


def add_attach(sub: Subparsers, name: str) -> None:
    p = sub.add_parser(
        name,
        help="hot-plug the devices of a fragment into a running VM",
        description="Add the [[vfio]], [[iommufd]], [[disk]] and [[net]] entries of FRAGMENT (written as in a "
        "config) to the running VM NAME: vmrun opens each file as at launch (as the VM's user), passes the fds "
        "over QMP and plugs each device into a free hot-plug slot ([vm] hotplug_slots). The memlock limit of "
        "the running QEMU is raised when the VM needs more. All or nothing: when a step fails, what was added "
        "is removed again. Exit status 2 for a bad fragment, 1 when the attach failed.",
    )
    p.add_argument("name", metavar="NAME")
    p.add_argument("fragment", metavar="FRAGMENT")
    add_host_root(p)


def add_detach(sub: Subparsers, name: str) -> None:
    p = sub.add_parser(
        name,
        help="unplug a device that vmrun attach added",
        description="Ask the guest to release the device ID (device_del), wait for QEMU to report it gone, "
        "then remove what backed it (block nodes, netdev, an iommufd object no device uses any more). A guest "
        "that does not let go within the timeout keeps the device: exit status 1. The memlock limit is left.",
    )
    p.add_argument("name", metavar="NAME")
    p.add_argument("id", metavar="ID")
    p.add_argument(
        "--timeout",
        type=seconds,
        default=DETACH_TIMEOUT,
        metavar="S",
        help=f"seconds to wait for the guest to release the device (default {DETACH_TIMEOUT:g})",
    )


def add_upgrade(sub: Subparsers, name: str) -> None:
    p = sub.add_parser(
        name,
        help="replace a running VM's QEMU with a new process (CPR transfer), the guest keeps running",
        description="Start a new QEMU (--qemu PATH, or the same binary) from the plan the VM runs with, as the "
        "same user with the same fds and limits, and hand it the running guest by CPR transfer: guest RAM "
        "(shared memory), VFIO devices and their DMA mappings move over while the guest pauses briefly. "
        "Until the hand-over completes, any failure leaves the old QEMU running the guest as before.",
    )
    p.add_argument("name", metavar="NAME")
    p.add_argument("--qemu", metavar="PATH", help="the new QEMU binary (default: the one the VM runs)")
    p.add_argument(
        "--timeout",
        type=seconds,
        default=UPGRADE_TIMEOUT,
        metavar="S",
        help=f"seconds the new QEMU has to take the guest over (default {UPGRADE_TIMEOUT:g})",
    )
    add_host_root(p)


def add_smoke(sub: Subparsers, name: str) -> None:
    p = sub.add_parser(
        name,
        help="launch configs paused and check their devices over QMP (CI)",
        description="For each config, launch it as `run` would but paused, check over QMP that every "
        "[[vfio]] device and [[iommufd]] object exists, then quit. With --boot, start the CPUs and wait "
        "for a serial console line that matches REGEX. Exit status 1 when any config fails.",
    )
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("--junit", metavar="PATH", help="write a JUnit XML report, one testcase per config")
    p.add_argument(
        "--timeout",
        type=seconds,
        default=SMOKE_TIMEOUT,
        metavar="S",
        help=f"seconds per config, launch to the end (default {SMOKE_TIMEOUT:g})",
    )
    p.add_argument("--boot", metavar="REGEX", help="boot the guest and wait for a console line matching REGEX")
    p.add_argument(
        "-j",
        "--jobs",
        type=positive,
        metavar="N",
        help="smoke-test N configs at a time (default: the number of CPUs)",
    )


def add_completion(sub: Subparsers, name: str) -> None:
    p = sub.add_parser(
        name,
        help="print a shell completion script",
        description="Print a completion script for bash or zsh, e.g. "
        "`vmrun completion bash > /etc/bash_completion.d/vmrun`.",
    )
    p.add_argument("shell", choices=("bash", "zsh"))


def cmd_validate(args: argparse.Namespace) -> int:
    from vmrun.config import loader

    status = EXIT_OK
    for file in args.files:
        try:
            cfg = loader.load(file)
        except ConfigError as e:
            print(e, file=sys.stderr)
            status = EXIT_USAGE
        else:
            merged = cfg.sources.dropins()
            print(f"{file}: ok" + (f" (with {', '.join(merged)})" if merged else ""))
    return status


def cmd_plan(args: argparse.Namespace) -> int:
    from vmrun.plan import render
    from vmrun.plan.planner import plan_file

    p = plan_file(args.file, args.host_root)
    sys.stdout.write(render.json_text(p) if args.json else render.text(p))
    return EXIT_OK


def say_err(line: str) -> None:
    from vmrun.base.text import printable_lines

    print(printable_lines(line), file=sys.stderr, flush=True)


def cmd_init(args: argparse.Namespace) -> int:
    from vmrun.config import parsers
    from vmrun.host import facts as host
    from vmrun.tools import init as config_init

    try:
        result = config_init.build(
            args.name, parsers.pci_addresses(args.devices), host.Host(args.host_root), args.legacy
        )
        config_init.output(args.output, result.text, args.force, say_err, "init")
    except config_init.InitError as e:
        raise UsageError(str(e)) from None
    for warning in result.warnings:
        say_err(f"vmrun init: {warning}")
    if result.needs_prepare:
        say_err(f"vmrun init: bind them with: vmrun prepare {args.output or args.name + '.toml'}")
    return EXIT_OK


def cmd_import(args: argparse.Namespace) -> int:
    from vmrun.tools import importer
    from vmrun.tools import init as config_init

    argv = args.qemu_args[1:] if args.qemu_args[:1] == ["--"] else args.qemu_args
    text = importer.config_text(argv, args.pid, args.host_root, args.name, args.output, args.from_libvirt)
    try:
        config_init.output(args.output, text, args.force, say_err, "import")
    except config_init.InitError as e:
        raise UsageError(str(e)) from None
    return EXIT_OK


def cmd_show(args: argparse.Namespace) -> int:
    from vmrun.config import loader
    from vmrun.tools import show

    cfg = loader.load(args.file)
    sys.stdout.write(show.json_text(cfg) if args.json else show.toml_text(cfg) if args.toml else show.text(cfg))
    return EXIT_OK


def cmd_schema(args: argparse.Namespace) -> int:
    from vmrun.tools import schema

    sys.stdout.write(schema.text(args.dropin))
    return EXIT_OK


def cmd_check(args: argparse.Namespace) -> int:
    import json

    from vmrun.plan.planner import plan_file
    from vmrun.tools import check

    report = check.check(plan_file(args.file, args.host_root))
    if args.json:
        sys.stdout.write(json.dumps(check.to_json(report), indent=2) + "\n")
    else:
        sys.stdout.write(check.text(report))
    return EXIT_OK if report.ok else EXIT_FAILED


def cmd_devices(args: argparse.Namespace) -> int:
    import json

    import attrs

    from vmrun.config import parsers
    from vmrun.host import facts as host
    from vmrun.host import pci

    devices = pci.list_devices(host.Host(args.host_root), set(parsers.pci_addresses(args.addresses)), args.group)
    if args.json:
        sys.stdout.write(json.dumps([attrs.asdict(d) for d in devices], indent=2) + "\n")
    else:
        sys.stdout.write(pci.table(devices))
    return EXIT_OK


def cmd_bind(args: argparse.Namespace) -> int:
    from vmrun.config import parsers
    from vmrun.host import facts as host
    from vmrun.launch.bind import Binder

    binder = Binder(host.Host(args.host_root))
    if args.command == "prepare":
        changes = binder.prepare(args.file)
    elif args.command == "bind":
        changes = binder.bind(parsers.pci_addresses(args.addresses))
    else:
        changes = binder.unbind(parsers.pci_addresses(args.addresses))
    for change in changes:
        print(change.render())
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    from vmrun.launch import start

    return start.run(args.file, args.host_root, args.paused, args.dry_run)


def cmd_ps(args: argparse.Namespace) -> int:
    from vmrun.control import lifecycle

    lifecycle.ps(show_all=args.all, as_json=args.json, names_only=args.quiet)
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    import json

    from vmrun.control import lifecycle

    status = lifecycle.status(args.name)
    sys.stdout.write(json.dumps(status.to_json(), indent=2) + "\n" if args.json else status.text())
    if status.qmp_error is not None:
        tell(f"vmrun status: QMP did not answer: {status.qmp_error}")
        return EXIT_FAILED
    return EXIT_OK


def cmd_stop(args: argparse.Namespace) -> int:
    from vmrun.control import lifecycle

    lifecycle.stop(args.name, args.timeout)
    return EXIT_OK


def cmd_qmp(args: argparse.Namespace) -> int:
    import json

    from vmrun.control import qmp, state

    arguments = None
    if args.qmp_args is not None:
        try:
            arguments = json.loads(args.qmp_args)
        except ValueError as e:
            raise UsageError(f"ARGS-JSON is not JSON: {e}") from None
        if not isinstance(arguments, dict):
            raise UsageError('ARGS-JSON must be a JSON object, e.g. \'{"path": "/objects"}\'')
    vm = state.running(args.name)
    answer = qmp.execute(vm.qmp_socket, args.qmp_command, arguments)
    print(json.dumps(answer, indent=2))
    return EXIT_OK


def say(line: str) -> None:
    from vmrun.base.text import printable_lines

    print(printable_lines(line), flush=True)


def cmd_attach(args: argparse.Namespace) -> int:
    from vmrun.launch import fd_open

    passed = fd_open.open_fds()  # before vmrun opens anything of its own
    from vmrun.control import hotplug

    hotplug.attach(args.name, args.fragment, args.host_root, say, passed)
    return EXIT_OK


def cmd_detach(args: argparse.Namespace) -> int:
    from vmrun.control import hotplug

    try:
        hotplug.detach(args.name, args.id, args.timeout, say)
    except hotplug.UnknownId as e:
        raise UsageError(str(e)) from None
    return EXIT_OK


def cmd_upgrade(args: argparse.Namespace) -> int:
    from vmrun.control import upgrade

    done = upgrade.upgrade(args.name, args.qemu, args.timeout, args.host_root)
    pause = f"the guest paused {done.pause * 1000:.0f} ms" if done.pause is not None else "pause not measured"
    say(
        f"upgraded VM {args.name}: QEMU {done.old_version} (pid {done.old_pid}) -> {done.new_version}"
        f" (pid {done.new_pid}) in {done.total:.1f} s; {pause}"
    )
    return EXIT_OK


def cmd_smoke(args: argparse.Namespace) -> int:
    import os
    import re

    from vmrun.tools import smoke

    try:
        boot = re.compile(args.boot) if args.boot is not None else None
    except re.error as e:
        raise UsageError(f"--boot {args.boot!r} is not a regular expression: {e}") from None

    jobs = args.jobs or os.cpu_count() or 1
    progress = say_err if jobs > 1 and len(args.files) > 1 else None
    results = smoke.run(args.files, args.timeout, boot, args.junit, say, jobs, progress)
    return EXIT_OK if all(r.ok for r in results) else EXIT_FAILED


def cmd_completion(args: argparse.Namespace) -> int:
    from vmrun.tools import completion

    sys.stdout.write(completion.script(parser(), args.shell))
    return EXIT_OK


# Each command: how its sub-parser is made, and what runs it. In the order `--help` lists them.
COMMANDS: dict[str, tuple[AddParser, Handler]] = {
    "validate": (add_validate, cmd_validate),
    "plan": (add_plan, cmd_plan),
    "init": (add_init, cmd_init),
    "import": (add_import, cmd_import),
    "show": (add_show, cmd_show),
    "schema": (add_schema, cmd_schema),
    "check": (add_check, cmd_check),
    "devices": (add_devices, cmd_devices),
    "bind": (add_bind, cmd_bind),
    "unbind": (add_bind, cmd_bind),
    "prepare": (add_prepare, cmd_bind),
    "run": (add_run, cmd_run),
    "ps": (add_ps, cmd_ps),
    "status": (add_status, cmd_status),
    "stop": (add_stop, cmd_stop),
    "qmp": (add_qmp, cmd_qmp),
    "attach": (add_attach, cmd_attach),
    "detach": (add_detach, cmd_detach),
    "upgrade": (add_upgrade, cmd_upgrade),
    "smoke": (add_smoke, cmd_smoke),
    "completion": (add_completion, cmd_completion),
}


def plain_run(argv: list[str]) -> argparse.Namespace | None:
    """`run`'s arguments when written plainly (`run [--dry-run] [--paused] [--host-root DIR] FILE`,
    options spelled out, in any order), read without building a parser; None for anything
    else, which argparse parses and explains. argparse's first parser costs as much as
    planning a VM (it imports shutil and locale and looks up translations), and `vmrun run`
    is what scripts and services call."""
    if not argv or argv[0] != "run":
        return None
    # What argparse's Namespace would hold, without importing argparse (and gettext) for it.
    args = types.SimpleNamespace(command="run", file=None, dry_run=False, paused=False, host_root="/")
    words = iter(argv[1:])
    for word in words:
        if word in ("--dry-run", "--paused"):
            setattr(args, word[2:].replace("-", "_"), True)
        elif word == "--host-root":
            args.host_root = next(words, "-")
            if args.host_root.startswith("-"):
                return None
        elif word.startswith("-") or args.file is not None:
            return None
        else:
            args.file = word
    return args if args.file is not None else None  # type: ignore[return-value]  # a Namespace in all but name


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # A command word first: its own parser is all that is needed (help, errors and all).
    args = plain_run(argv) or parser(argv[0] if argv and argv[0] in COMMANDS else None).parse_args(argv)
    try:
        return COMMANDS[args.command][1](args)
    except ConfigError as e:
        tell(str(e))
        return EXIT_USAGE
    except UsageError as e:
        tell(f"vmrun {args.command}: {e}")
        return EXIT_USAGE
    except LaunchError as e:
        tell(f"vmrun: {e}")
        return EXIT_FAILED
    except BadName as e:
        tell(f"vmrun {args.command}: {e}")
        return EXIT_USAGE
    except VmError as e:
        tell(f"vmrun {args.command}: {e}")
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130


def tell(message: str) -> None:
    """An error on stderr: whatever QEMU, a guest or a file put in it shows as escapes."""
    from vmrun.base.text import printable_lines

    print(printable_lines(message), file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
