"""QMP sessions to the VMs' monitor sockets, for synchronous callers, over `qemu.qmp`.

Each failure becomes a VmError that says what happened in the user's terms: no socket
(not running), refused (nobody listens), no greeting (QEMU serves one client at a time,
or is stopped or hung), a command error as QEMU words it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any

from qemu.qmp import ConnectError, EventListener, ExecInterruptedError, ExecuteError, QMPClient, QMPError

from vmrun.base.errors import VmError
from vmrun.base.text import printable

CONNECT_TIMEOUT = 5.0
COMMAND_TIMEOUT = 30.0


class QmpError(VmError):
    pass


class CommandFailed(QmpError):
    """QEMU received the command and answered with an error."""

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        # QEMU's words are data: whoever answers the socket chose them (see vmrun/base/text.py).
        desc, error_class = printable(desc), printable(error_class)
        super().__init__(f"QMP {command} failed: {desc} ({error_class})")
        self.command = command
        self.error_class = error_class
        self.desc = desc


class Closed(QmpError):
    """QEMU closed the connection (it exited, or quit as asked)."""


def connect_error(path: str, e: BaseException, timeout: float) -> QmpError:
    cause = e.exc if isinstance(e, ConnectError) else e
    if isinstance(cause, FileNotFoundError):
        return QmpError(f"no QMP socket at {path}", "the VM is not running, or was not started by vmrun")
    if isinstance(cause, ConnectionRefusedError):
        return QmpError(
            f"the QMP socket {path} refused the connection: nothing listens on it",
            "QEMU has exited, or is starting; `vmrun ps` shows what runs",
        )
    if isinstance(cause, PermissionError):
        return QmpError(
            f"cannot connect to {path}: permission denied",
            "run vmrun as the user who started the VM, or as root",
        )
    if isinstance(cause, TimeoutError):
        return QmpError(
            f"QEMU did not greet on {path} within {timeout:g} s",
            "QEMU serves one QMP client at a time: another `vmrun qmp`, `status` or `stop` may hold it; "
            "or QEMU is stopped (SIGSTOP) or hung",
        )
    if isinstance(cause, EOFError | ConnectionResetError):
        return Closed(f"QEMU closed {path} while vmrun connected", "the VM is exiting, or another client holds it")
    return QmpError(f"cannot talk QMP on {path}: {printable(str(cause))}")


class Monitor:
    """One QMP session: `with Monitor(path) as m: m.execute("query-status")`."""

    def __init__(self, path: str, connect_timeout: float = CONNECT_TIMEOUT) -> None:
        self.path = path
        self.connect_timeout = connect_timeout
        self.runner = asyncio.Runner()
        self.client = QMPClient("vmrun")
        self.closed = False

    def __enter__(self) -> Monitor:
        self.connect()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def connect(self) -> None:
        try:
            self.runner.run(asyncio.wait_for(self.client.connect(self.path), self.connect_timeout))
        except (QMPError, OSError, EOFError, TimeoutError) as e:
            self.close()
            raise connect_error(self.path, e, self.connect_timeout) from None

    def execute(
        self,
        command: str,
        arguments: Mapping[str, object] | None = None,
        timeout: float = COMMAND_TIMEOUT,
    ) -> Any:
        """QEMU's answer to `command` (the value of "return")."""
        try:
            return self.runner.run(asyncio.wait_for(self.client.execute(command, arguments), timeout))
        except ExecuteError as e:
            raise CommandFailed(command, e.error_class, str(e)) from None
        except (ExecInterruptedError, EOFError, ConnectionError) as e:
            raise Closed(f"QEMU closed the QMP connection during {command}") from e
        except TimeoutError:
            raise QmpError(f"QEMU did not answer QMP {command} within {timeout:g} s", "is QEMU hung?") from None
        except QMPError as e:
            raise QmpError(f"QMP {command}: {printable(str(e))}") from None

    def pass_fd(self, fd: int) -> None:
        """Send `fd` over the socket (SCM_RIGHTS); QEMU keeps it for the next getfd or add-fd."""
        try:
            self.client.send_fd_scm(fd)
        except (QMPError, OSError) as e:
            raise QmpError(f"cannot pass fd {fd} to QEMU over {self.path}: {e}") from None

    def listen(self, event: str) -> EventListener:
        """Start collecting `event`s now, before the command that causes them is sent."""
        listener = EventListener(names=(event,))
        self.client.register_listener(listener)
        return listener

    def wait_event(
        self, listener: EventListener, match: Callable[[Mapping[str, Any]], bool], timeout: float
    ) -> Mapping[str, Any] | None:
        """The first event `listener` hears that `match`es, within `timeout` seconds; else None."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                message = self.runner.run(asyncio.wait_for(listener.get(), left))
            except TimeoutError:
                return None
            except (EOFError, ConnectionError, QMPError) as e:
                raise Closed(f"QEMU closed the QMP connection while vmrun waited for {listener.names}") from e
            data = message.get("data", {})
            if match(data if isinstance(data, Mapping) else {}):
                return message
        return None

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        # The session may already be torn down by QEMU (after quit, or a crash): whatever
        # disconnect reports then is no news to the caller.
        with contextlib.suppress(Exception):
            self.runner.run(self.client.disconnect())
        self.runner.close()


def execute(path: str, command: str, arguments: Mapping[str, object] | None = None) -> Any:
    """One command in its own session."""
    with Monitor(path) as m:
        return m.execute(command, arguments)
