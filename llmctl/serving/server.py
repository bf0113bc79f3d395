"""Run the API under uvicorn: check the model dir and the port before anything else, listen, load the
model in a thread while /health answers 503, and on SIGTERM stop accepting, finish what is in flight,
stop the runner and return 0.

The model is read once before listening (model_info.py); its task's serving module
(`llmctl.tasks.<task>.serving`) says what else it needs, starts its runner (the generation engine, the
classifier runner) and gives the routes the app mounts."""

from __future__ import annotations

import contextlib
import errno
import signal
import socket
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import uvicorn

from llmctl.errors import EXIT_BAD_INPUT, EXIT_FAILURE, LlmctlError
from llmctl.progress import Progress, read_ahead, silent_if_none
from llmctl.serving.model_info import ModelInfo, backend_label, inspect_model, load_served_model, weight_files


@dataclass
class ServeOptions:
    """`llmctl serve`'s settings (see its --help)."""

    path: Path
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_batch_size: int | None = None  # sequences decoded together (a language model; None: 16)
    max_queue: int = 64  # sequences (a classifier: requests) waiting for the model before 503
    max_tokens_limit: int | None = None  # largest max_tokens a request may ask for; default: the context length
    dtype: str = "fp32"
    graph: str | None = None  # an export dir's graph: fp32 (model.onnx, the default) or int8 (model.int8.onnx)
    model_name: str | None = None


def default_model_name(path: Path) -> str:
    """The run's name for runs/<name>/model, else the directory's own name."""
    path = Path(path).resolve()
    if path.name == "model" and (path.parent / "recipe.yaml").is_file():
        return path.parent.name
    return path.name


def bind_socket(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (not yet listening); a port in use or a bad host is an LlmctlError."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise LlmctlError(f"--host {host}: not an address this machine can listen on ({e.strerror}).") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # restart at once after a stop (TIME_WAIT)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise LlmctlError(f"--port {port}: already in use on {host}; stop what listens there or pick another "
                              "port with --port.") from None
        if e.errno == errno.EACCES:
            raise LlmctlError(f"--port {port}: needs privileges on this machine; pick one above 1023.") from None
        if e.errno == errno.EADDRNOTAVAIL:
            raise LlmctlError(f"--host {host}: not an address of this machine.") from None
        raise LlmctlError(f"cannot listen on {host}:{port} ({e.strerror}).") from None
    return sock


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def serve(options: ServeOptions, say: Callable[[str], None], progress: Progress | None = None,
          announce: Callable[[str], None] | None = None) -> int:
    """Serve until SIGTERM or SIGINT; the exit status (0 after a SIGTERM drain, 130 after Ctrl-C).

    `announce` (default `say`) prints the address the server listens on, which a caller that
    silences `say` still needs (--port 0 picks the port).

    `progress` (entered and closed by the loading thread) hears the startup stages: reading the
    weights (in bytes), loading the model, starting the engine.

    Bad input (model dir, port, options) raises LlmctlError before listening. A model that fails to
    load after listening stops the server: 2 for a bad model dir, 1 for anything else.
    """
    from llmctl.serving.api import create_app
    from llmctl.serving.metrics import ServerMetrics
    from llmctl.serving.state import ServingState

    info = inspect_model(options.path, options.dtype, options.graph)
    serving = info.task.serving
    serving.refuse_options(options, info)
    fields = serving.state_fields(info, options)
    sock = bind_socket(options.host, options.port)
    name = options.model_name or default_model_name(options.path)
    state = ServingState(
        model_name=name, tokenizer=info.tokenizer, context_length=info.context_length, vocab_size=info.vocab_size,
        metrics=ServerMetrics(), task=info.task.name, api_key=options.api_key,
        backend=backend_label(info, options.dtype), **fields,
    )
    config = uvicorn.Config(
        create_app(state), log_level="warning", access_log=False, lifespan="off", ws="none",
        timeout_graceful_shutdown=None,  # SIGTERM: every request in flight runs to its end
    )
    server = _Server(config)
    outcome = {"exit": 0}
    loader = threading.Thread(target=_load, args=(state, info, options, server, outcome, say, silent_if_none(progress)),
                              name="llmctl-load", daemon=True)

    def on_listening() -> None:
        say(f"serving {name} ({serving.kind_note(info)}{state.backend}) from {options.path}")
        (announce or say)(f"listening on {_url(sock)}  ({serving.ROUTES}; GET /health, GET /metrics)"
                          + ("; API key required" if options.api_key else ""))
        if not options.api_key and not _is_loopback(sock):
            say(f"warning: listening beyond this machine ({options.host}) without --api-key; anyone who reaches "
                "the port can use the model")
        loader.start()

    def on_signal(sig: int) -> None:
        engine = state.engine
        busy = (engine.batch_size + engine.queue_depth) if engine is not None else 0
        say(f"{signal.Signals(sig).name}: no new requests; finishing {busy} in flight, then stopping")

    server.on_listening, server.on_signal = on_listening, on_signal
    server.run(sockets=[sock])
    if state.status == "loading":
        state.status = "stopping"  # a signal during loading: the loader starts no engine
    if loader.is_alive():
        loader.join()
    if state.engine is not None:
        state.status = "stopping"
        state.engine.stop(drain=True)
    if outcome["exit"]:
        return outcome["exit"]
    say("stopped")
    return 130 if signal.SIGINT in server.signals else 0


def _is_loopback(sock: socket.socket) -> bool:
    import ipaddress

    return ipaddress.ip_address(sock.getsockname()[0].split("%")[0]).is_loopback


def _load(state: Any, info: ModelInfo, options: ServeOptions, server: "_Server", outcome: dict, say: Callable,
          progress: Progress) -> None:
    """The startup thread: load the weights, start the engine, mark the server ready (or stop it)."""
    try:
        t0 = time.perf_counter()
        with progress:
            engine, detail = _start(state, info, options, progress)
        if engine is None:
            return
        state.metrics.bind_engine(engine)
        state.engine = engine
        state.status = "ready"
        say(f"ready in {time.perf_counter() - t0:.1f} s: {detail}")
    except LlmctlError as e:
        _fail(state, server, outcome, e.message, EXIT_BAD_INPUT, say)
    except Exception as e:  # a bug or an environment problem: keep the traceback for the report
        traceback.print_exc()
        _fail(state, server, outcome, f"{type(e).__name__}: {e}", EXIT_FAILURE, say)


def _start(state: Any, info: ModelInfo, options: ServeOptions, progress: Progress) -> tuple[Any, str]:
    """Load the model and start its runner (None if the server began stopping meanwhile), and what to say of it."""
    progress.stage(f"reading the weights of {info.path}", unit="bytes")
    read_ahead(weight_files(info), progress.update)
    progress.stage("loading the model")
    model = load_served_model(info, options.dtype)
    if state.status == "stopping":
        return None, ""
    progress.stage("starting the engine")
    return info.task.serving.start_runner(model, state, options)


def _fail(state: Any, server: "_Server", outcome: dict, message: str, code: int, say: Callable) -> None:
    state.failure, state.status = message, "failed"
    outcome["exit"] = code
    say(f"error: cannot load the model: {message}")
    server.should_exit = True


class _Server(uvicorn.Server):
    """uvicorn's Server, told when it listens, and keeping the exit status of a SIGTERM drain at 0.

    uvicorn re-raises a caught SIGTERM after its graceful shutdown (so the process would end by the
    signal, status 143); here the signal only starts the shutdown.
    """

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.signals: list[int] = []
        self.on_listening: Callable[[], None] = lambda: None
        self.on_signal: Callable[[int], None] = lambda sig: None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            self.on_listening()

    def handle_exit(self, sig: int, frame: Any) -> None:
        first = not self.signals
        self.signals.append(sig)
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True  # a second Ctrl-C: stop waiting for requests in flight
        self.should_exit = True
        if first:
            self.on_signal(sig)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)
