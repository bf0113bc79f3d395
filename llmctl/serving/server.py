"""Run the API under uvicorn: check the model dir and the port before anything else, listen, load the
model in a thread while /health answers 503, and on SIGTERM stop accepting, finish what is in flight,
stop the engine and return 0.

A language model is served by the generation engine (engine.py); a classifier (its config.json names
`num_classes`) by the classifier runner (classify.py) behind POST /v1/classify. Which one is decided
from config.json before listening, without torch."""

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

from llmctl.artifacts import ExportDir, ModelDir, read_json_artifact
from llmctl.errors import EXIT_BAD_INPUT, EXIT_FAILURE, LlmctlError
from llmctl.progress import Progress, read_ahead, silent_if_none
from llmctl.serving.classify import ClassifierSpec
from llmctl.serving.protocol import MAX_CLASSIFY_TEXTS

DTYPES = ("fp32", "bf16")
GRAPHS = ("fp32", "int8")  # an export dir's model.onnx, or model.int8.onnx (`export --quantize int8`)
DEFAULT_BATCH = 16  # sequences a language model decodes together unless --max-batch-size says otherwise


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


@dataclass
class ModelInfo:
    """What can be known of a model or export dir without loading its weights (cheap: no torch)."""

    path: Path
    backend: str  # torch | onnxruntime
    config: dict[str, Any]
    config_path: Path
    tokenizer: Any  # tokenizers.Tokenizer
    eot_id: int  # a classifier's pad id
    context_length: int  # tokens; a classifier's max_len (tokens it reads per text)
    vocab_size: int
    quantization: str | None
    classifier: ClassifierSpec | None = None  # None: a language model
    graph: Path | None = None  # the ONNX graph ONNX Runtime runs (an export dir), else None


def _graph_file(export: ExportDir, graph: str | None) -> Path:
    """The ONNX file of an export dir that `--graph` names (None: fp32, model.onnx)."""
    return export.onnx_int8 if graph == "int8" else export.onnx


def inspect_model(path: Path, dtype: str, graph: str | None = None) -> ModelInfo:
    """Check that `path` is a servable model or export dir (and `graph` one of its graphs) and read its
    config and tokenizer; refuses anything else with an LlmctlError naming what to change."""
    from tokenizers import Tokenizer

    from llmctl.data.tokenizer import eot_id
    from llmctl.models.loading import backend_of

    path = Path(path)
    if dtype not in DTYPES:
        raise LlmctlError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}.")
    if graph is not None and graph not in GRAPHS:
        raise LlmctlError(f"--graph {graph!r}: expected one of {', '.join(GRAPHS)}.")
    _refuse_a_graph_file(path)
    backend = backend_of(path)
    onnx = None
    if backend == "torch":
        if graph is not None:
            raise LlmctlError(f"--graph {graph}: picks the graph of an ONNX export dir; {path} is a model dir (torch). "
                              "Drop --graph, or serve the export dir.")
        layout = ModelDir(path)
        layout.check()
        config_path, tokenizer_path, what = layout.config, layout.tokenizer, "model dir"
    else:
        export = ExportDir(path)
        onnx = _graph_file(export, graph)
        if graph == "int8" and not onnx.is_file():
            raise LlmctlError(f"--graph int8: {path} has no {onnx.name}; write it with `llmctl export ... --quantize "
                              "int8`, or drop --graph to serve model.onnx.")
        for needed in (onnx, export.tokenizer, export.config):
            if not needed.is_file():
                raise LlmctlError(f"{path}: an export dir without {needed.name}; write it again with `llmctl export`.")
        config_path, tokenizer_path, what = export.config, export.tokenizer, "export dir"
    config = read_json_artifact(config_path, what)
    try:
        tokenizer = Tokenizer.from_file(str(tokenizer_path))
    except Exception as e:  # the Rust side raises a bare Exception for any parse problem
        raise LlmctlError(f"{tokenizer_path}: not a readable tokenizer.json ({e}).") from None
    classifier = ClassifierSpec.from_config(config, str(config_path)) if ClassifierSpec.is_classifier(config) else None
    context, vocab = config.get("context_length"), config.get("vocab_size")
    if classifier is not None:
        context = classifier.max_len
        if not isinstance(vocab, int) or vocab < 1:
            raise LlmctlError(f"{config_path}: needs an integer vocab_size; the {what} is damaged.")
    elif not isinstance(context, int) or context < 2 or not isinstance(vocab, int) or vocab < 1:
        raise LlmctlError(f"{config_path}: needs integer context_length and vocab_size; the {what} is damaged.")
    quantization = config.get("quantization")
    scheme = quantization.get("scheme") if isinstance(quantization, dict) else None
    if dtype == "bf16" and backend == "onnxruntime":
        raise LlmctlError(f"--dtype bf16: {path} is an export dir, run by ONNX Runtime in fp32; drop --dtype "
                          "or serve the model dir it was exported from.")
    if dtype == "bf16" and scheme:
        raise LlmctlError(f"--dtype bf16: {path} is quantized ({scheme}) and runs in its own precision; drop --dtype.")
    eot = classifier.pad_id if classifier is not None else eot_id(tokenizer)
    return ModelInfo(path, backend, config, config_path, tokenizer, eot, context, vocab, scheme, classifier, onnx)


def _refuse_a_graph_file(path: Path) -> None:
    """An .onnx file inside an export dir is served through its dir: say how."""
    if path.is_file() and path.suffix == ".onnx" and ExportDir(path.parent).is_export():
        flag = " --graph int8" if path.name == ExportDir(path.parent).onnx_int8.name else ""
        raise LlmctlError(f"{path}: a graph file; serve its export dir: `llmctl serve {path.parent}{flag}`.")


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
    from llmctl.serving.api import ServingState, create_app
    from llmctl.serving.chat import chat_template_of
    from llmctl.serving.metrics import ServerMetrics

    info = inspect_model(options.path, options.dtype, options.graph)
    _refuse_language_model_options(options, info)
    limit = options.max_tokens_limit or info.context_length
    if limit < 1:
        raise LlmctlError(f"--max-tokens-limit {limit}: must be at least 1.")
    eos = info.tokenizer.id_to_token(info.eot_id) or ""
    template = chat_template_of(info.config, str(info.config_path), eos)
    sock = bind_socket(options.host, options.port)
    name = options.model_name or default_model_name(options.path)
    state = ServingState(
        model_name=name, tokenizer=info.tokenizer, eot_id=info.eot_id, context_length=info.context_length,
        vocab_size=info.vocab_size, max_tokens_limit=limit, chat_template=template, metrics=ServerMetrics(),
        api_key=options.api_key, backend=_backend_label(info, options.dtype), classifier=info.classifier,
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
        kind = "" if info.classifier is None else f"a classifier: {', '.join(info.classifier.labels)}; "
        routes = "OpenAI API under /v1" if info.classifier is None else "POST /v1/classify, GET /v1/models"
        say(f"serving {name} ({kind}{state.backend}) from {options.path}")
        (announce or say)(f"listening on {_url(sock)}  ({routes}; GET /health, GET /metrics)"
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


def _refuse_language_model_options(options: ServeOptions, info: ModelInfo) -> None:
    """A classifier has no decode batch and no max_tokens: refuse those flags rather than ignore them."""
    if info.classifier is None:
        return
    given = [flag for flag, value in (("--max-batch-size", options.max_batch_size),
                                      ("--max-tokens-limit", options.max_tokens_limit)) if value is not None]
    if given:
        raise LlmctlError(
            f"{', '.join(given)}: for language models; {options.path} is a classifier, which reads up to "
            f"{MAX_CLASSIFY_TEXTS} texts per forward (--max-queue bounds the requests waiting)."
        )


def _is_loopback(sock: socket.socket) -> bool:
    import ipaddress

    return ipaddress.ip_address(sock.getsockname()[0].split("%")[0]).is_loopback


def _backend_label(info: ModelInfo, dtype: str) -> str:
    if info.backend == "onnxruntime":
        return "onnxruntime int8" if info.graph == ExportDir(info.path).onnx_int8 else "onnxruntime"
    return f"torch-{info.quantization}" if info.quantization else f"torch {dtype}"


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
    """Load the model and start its engine (None if the server began stopping meanwhile), and what to say of it."""
    files = _weight_files(info)
    progress.stage(f"reading the weights of {info.path}", unit="bytes")
    read_ahead(files, progress.update)
    progress.stage("loading the model")
    model = load_served_model(info, options.dtype)
    if state.status == "stopping":
        return None, ""
    progress.stage("starting the engine")
    if info.classifier is not None:
        engine = _start_classifier(state, model, options)
        detail = (f"labels {', '.join(info.classifier.labels)}, texts cut to {info.context_length} tokens, up to "
                  f"{MAX_CLASSIFY_TEXTS} texts per forward, queue {options.max_queue} requests")
    else:
        from llmctl.serving.engine import Engine

        engine = Engine(model, context_length=info.context_length,
                        max_batch_size=options.max_batch_size or DEFAULT_BATCH, max_queue=options.max_queue,
                        on_step=state.metrics.on_step)
        engine.start()
        detail = (f"context {info.context_length} tokens, max_tokens up to {state.max_tokens_limit}, batch "
                  f"{options.max_batch_size or DEFAULT_BATCH}, queue {options.max_queue}")
    return engine, detail


def load_served_model(info: ModelInfo, dtype: str = "fp32") -> Any:
    """The model `info` describes, loaded as the server runs it: in `dtype` (torch), or on the graph
    `--graph` chose, with ONNX Runtime's threads never spinning. Spinning threads starve the HTTP
    thread and the engine's own Python between steps: 16 clients got fewer tokens/s than one."""
    from llmctl.models.loading import load_for_inference

    loaded = load_for_inference(info.path, onnx_file=info.graph.name if info.graph is not None else None,
                                spin_threads=False)
    model = loaded.model
    if dtype == "bf16":
        import torch

        model = model.to(torch.bfloat16)
    if (getattr(model, "task", None) == "classification") != (info.classifier is not None):
        kind = "a classifier" if info.classifier is not None else "a language model"
        raise LlmctlError(f"{info.config_path} describes {kind} but the model loaded from {info.path} is not one; "
                          "the dir is damaged: write it again.")
    return model


def _weight_files(info: ModelInfo) -> list[Path]:
    """The files loading reads its weights from: an export dir's graph (+ data), else *.safetensors."""
    if info.graph is not None:
        graph = info.graph
        return [f for f in (graph, graph.with_name(graph.name + ".data")) if f.is_file()]
    return sorted(Path(info.path).glob("*.safetensors"))


def _start_classifier(state: Any, model: Any, options: ServeOptions) -> Any:
    """The classifier's runner, started: one thread owns the model, a request's texts go in one forward."""
    from llmctl.serving.classify import ClassifierRunner

    runner = ClassifierRunner(model, max_texts=MAX_CLASSIFY_TEXTS, max_queue=options.max_queue,
                              on_forward=state.metrics.on_forward)
    runner.start()
    return runner


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
