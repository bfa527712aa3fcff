"""Putting it together: load a model, start the engine thread, serve the API with uvicorn.

:func:`start_in_thread` runs the whole server on a background thread (tests, benchmarks, notebooks);
:func:`serve_forever` runs it on the calling (main) thread until SIGINT/SIGTERM, then stops accepting
connections, lets in-flight requests finish for up to ``shutdown_timeout`` seconds, aborts the rest and
returns (the command exits 0).
"""

from __future__ import annotations

import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from llmctl.core.errors import LlmctlError
from llmctl.core.generate.engine import Engine
from llmctl.core.serve.api import ServerState, build_app
from llmctl.core.serve.engine import AsyncEngine, ServeConfig, ServeEngine
from llmctl.core.serve.metrics import ServeMetrics


@dataclass
class Server:
    state: ServerState
    app: object
    sock: socket.socket
    uvicorn_server: object = None
    thread: threading.Thread | None = None

    @property
    def host(self) -> str:
        return self.sock.getsockname()[0]

    @property
    def port(self) -> int:
        return self.sock.getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def core(self) -> ServeEngine:
        return self.state.async_engine.core

    def stop(self, timeout: float = 10.0) -> None:
        if self.uvicorn_server is not None:
            self.uvicorn_server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout)
        self.state.async_engine.shutdown(timeout)
        self.sock.close()


def create_server(
    engine: Engine,
    config: ServeConfig,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    model_name: str = "model",
    api_key: str | None = None,
    log: Callable[[str], None] | None = None,
    draft: Engine | None = None,
    info: Callable[[str], None] | None = None,
) -> Server:
    """Build the engine, the app and a bound listening socket (``port=0`` picks a free port).
    ``draft``: a draft model for speculative decoding (same vocabulary as ``engine``)."""
    metrics = ServeMetrics(model_name)
    core = ServeEngine(engine, config, metrics, draft=draft)
    metrics.attach(core)
    async_engine = AsyncEngine(core, log=log, info=info)
    state = ServerState(engine, async_engine, metrics, model_name, api_key)
    app = build_app(state)
    try:
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as e:
        raise LlmctlError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(2048)
    sock.setblocking(False)
    return Server(state, app, sock)


def _uvicorn(server: Server, shutdown_timeout: float):
    import uvicorn

    config = uvicorn.Config(
        server.app,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=shutdown_timeout,
        lifespan="off",
    )
    return uvicorn.Server(config)


def start_in_thread(server: Server, shutdown_timeout: float = 5.0) -> Server:
    """Serve on a daemon thread; returns once the server accepts connections."""
    server.state.async_engine.start()
    server.uvicorn_server = _uvicorn(server, shutdown_timeout)
    server.thread = threading.Thread(
        target=server.uvicorn_server.run,
        kwargs={"sockets": [server.sock]},
        daemon=True,
        name="llmctl-serve-http",
    )
    server.thread.start()
    deadline = time.monotonic() + 30
    while not server.uvicorn_server.started:
        if not server.thread.is_alive() or time.monotonic() > deadline:
            raise LlmctlError("the HTTP server did not start")
        time.sleep(0.02)
    return server


def serve_forever(server: Server, shutdown_timeout: float = 30.0) -> None:
    """Serve on this thread until SIGINT/SIGTERM; then drain and return normally."""
    server.state.async_engine.start()
    uv = _uvicorn(server, shutdown_timeout)
    server.uvicorn_server = uv
    # uvicorn captures SIGINT/SIGTERM while it runs and re-raises them once it has shut down; with these
    # handlers in place the re-raised signal is a no-op, so a signalled server exits 0.
    previous = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        uv.run(sockets=[server.sock])
    finally:
        server.state.async_engine.shutdown(shutdown_timeout)
        server.sock.close()
        for s, handler in previous.items():
            signal.signal(s, handler)
