"""Serving the app: uvicorn in a thread beside the daemon, or in the foreground.

    server = WebServer(app, host, port); server.start() ... server.stop()   # web.listen
    serve(config, host, port)                                               # cliptagd web

The socket is bound here, before uvicorn starts, so that a port already taken is an error
that names the address and the setting to change, raised where the caller can catch it
(uvicorn would log it and exit its thread). uvicorn always runs in a thread of its own, so
it never takes the process's signals. Its access log is off: the first request of a
session carries the token in its URL.
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
import time

import uvicorn
from fastapi import FastAPI

from ..config import Config
from .app import create_app
from .auth import load_token, login_url

log = logging.getLogger(__name__)

# How long a stop waits for requests in flight (a thumbnail being made) before it ends them.
GRACEFUL_SECONDS = 5
# How long start() waits for uvicorn to say it listens: it only starts its loop by then.
START_TIMEOUT = 30.0


class ListenError(OSError):
    """The address to serve on cannot be used (the port is taken, the host is not ours)."""


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: any free one); ListenError if it cannot be."""
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise ListenError(
            f"Cannot serve the web app on {where}: {exc.strerror or exc} "
            "(web.listen in the config names the address)"
        ) from None
    try:
        # A restart may bind the port again at once, while the old connections linger.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise ListenError(
            f"Cannot serve the web app on {where}: {exc.strerror or exc} (another program "
            "may be using the port; web.listen in the config changes it)"
        ) from None
    return sock


def _server(app: FastAPI) -> uvicorn.Server:
    return uvicorn.Server(
        uvicorn.Config(
            app,
            log_config=None,  # the program configures logging, uvicorn's loggers included
            access_log=False,
            proxy_headers=False,
            server_header=False,
            timeout_graceful_shutdown=GRACEFUL_SECONDS,
        )
    )


class WebServer:
    """The app served by uvicorn in a thread of the daemon's process."""

    def __init__(self, app: FastAPI, host: str, port: int) -> None:
        self.app = app
        self.host = host
        self.port = port  # the port asked; after start(), the one bound (port 0: a free one)
        self._server = _server(app)
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Listen, and return once requests are answered; ListenError if it cannot."""
        sock = bind(self.host, self.port)
        self.port = sock.getsockname()[1]
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name="cliptagd-web", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT
        while self._thread.is_alive() and not self._server.started:
            if time.monotonic() > deadline:
                self.stop()
                break
            time.sleep(0.01)
        if not self._server.started:
            sock.close()
            raise ListenError(f"The web app on {self.host}:{self.port} did not start")
        log.info("Serving the web gallery on %s:%d", self.host, self.port)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        """Stop taking requests, finish those in flight, and wait for the thread."""
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(GRACEFUL_SECONDS + 5)
            self._thread = None


def serve(config: Config, host: str, port: int) -> None:
    """`cliptagd web`: serve the gallery in the foreground until SIGTERM or Ctrl-C. Raises
    ConfigError (the token file) or ListenError."""
    token, generated = load_token(config)
    server = WebServer(create_app(config, token=token), host, port)
    server.start()
    shown = socket.gethostname() if host in ("0.0.0.0", "::", "") else host
    if generated:
        # As Jupyter does: the one way in, since the token was made up just now.
        log.info("Open the gallery at %s", login_url(shown, server.port, token))
    else:
        url = login_url(shown, server.port, "").removesuffix("?token=")
        log.info("Open the gallery at %s?token=TOKEN (TOKEN: in %s)", url, config.web.token_file)
    stop = threading.Event()
    # uvicorn runs in its thread, so the signals are ours: a clean return, not uvicorn
    # raising the signal again once it has stopped.
    previous = {
        signum: signal.signal(signum, lambda *_: stop.set())
        for signum in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        while not stop.wait(0.5) and server.running:
            pass
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        log.info("Stopping the web gallery")
        server.stop()
