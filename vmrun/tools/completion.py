"""Shell completion scripts for vmrun, generated from its argument parser by shtab.

What an argument completes to follows from its metavar, so the parsers need no shtab
annotations and vmrun imports shtab only here: FILE and PATH complete file names, DIR
directories, NAME the running VMs (`vmrun ps --quiet`), ADDR the host's PCI addresses.
"""

from __future__ import annotations

import argparse

SHELLS = ("bash", "zsh")

PREAMBLE = {
    "bash": """\
_vmrun_vm_names() {
  compgen -W "$(vmrun ps --quiet 2>/dev/null)" -- "$1"
}
_vmrun_pci_addresses() {
  compgen -W "$(ls /sys/bus/pci/devices 2>/dev/null)" -- "$1"
}
""",
    "zsh": "",
}
VM_NAMES = {"bash": "_vmrun_vm_names", "zsh": "($(vmrun ps --quiet 2>/dev/null))"}
PCI_ADDRESSES = {"bash": "_vmrun_pci_addresses", "zsh": "($(ls /sys/bus/pci/devices 2>/dev/null))"}


def annotate(parser: argparse.ArgumentParser) -> None:
    import shtab

    by_metavar = {
        "FILE": shtab.FILE,
        "PATH": shtab.FILE,
        "DIR": shtab.DIRECTORY,
        "NAME": VM_NAMES,
        "ADDR": PCI_ADDRESSES,
    }
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                annotate(sub)
        elif isinstance(action.metavar, str) and action.metavar in by_metavar:
            action.complete = by_metavar[action.metavar]  # type: ignore[attr-defined]


def script(parser: argparse.ArgumentParser, shell: str) -> str:
    import shtab

    annotate(parser)
    text: str = shtab.complete(parser, shell=shell, preamble=PREAMBLE[shell])
    return text if text.endswith("\n") else text + "\n"
