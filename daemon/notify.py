"""systemd's notification protocol (sd_notify): READY, WATCHDOG, STOPPING, STATUS.

The protocol is one datagram to the socket named by $NOTIFY_SOCKET; systemd documents it as
stable and meant to be spoken directly, so no C library is needed. Outside systemd (no
$NOTIFY_SOCKET) every call is a no-op.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


class Notifier:
    """Sends state changes to systemd when run under a Type=notify unit."""

    def __init__(self, address: str | None = None) -> None:
        self.address = address if address is not None else os.environ.get("NOTIFY_SOCKET", "")
        if self.address.startswith("@"):  # an abstract socket
            self.address = "\0" + self.address[1:]

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def watchdog_interval(self) -> float | None:
        """Seconds between WATCHDOG=1 pings systemd expects (half of WatchdogSec), or None."""
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        if not usec or (pid and pid != str(os.getpid())):
            return None
        try:
            return int(usec) / 1e6 / 2
        except ValueError:
            return None

    def send(self, *fields: str) -> None:
        if not self.enabled:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto("\n".join(fields).encode(), self.address)
        except OSError as exc:  # systemd gone or socket not reachable: never fatal
            log.debug("Cannot notify systemd at %r: %s", self.address, exc)

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        self.send(f"STATUS={status}")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    def stopping(self) -> None:
        self.send("STOPPING=1", "STATUS=Stopping")

    def reloading(self) -> None:
        self.send("RELOADING=1", "STATUS=Reloading the config")
