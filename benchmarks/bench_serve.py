#!/usr/bin/env python
"""`llmctl serve` under load: generated tokens/s with 1 client and with 16 concurrent clients on the same
server, request latency, time to first token and the server's CPU time per token, for the torch backend
(a model dir) and the ONNX Runtime backend (its export dir) side by side.

    .venv/bin/python benchmarks/bench_serve.py [--backend torch|onnxruntime|both] [--model-dir DIR]
                                               [--rounds R] [--quick] [--out FILE]

Each server is the real command (`python -m llmctl serve DIR --port P`, defaults otherwise: max batch
16, queue 64) in a subprocess on a free loopback port, started once; the clients are this process
(raw sockets, asyncio). The model is `--model-dir`, or a tiny-gpt-shaped `gpt` (recipes/tiny-gpt.yaml:
4 layers, 4 heads, d_model 128, context 128, vocab 4,096) with random weights (seed 0) and a byte-level
BPE tokenizer trained on ~2 MB of this Python's standard library, saved as a model dir in a temp dir;
the ONNX Runtime backend serves its export (`llmctl.export.onnx_export.export_onnx`, fp32). Both
servers run for the whole benchmark; only one is sent requests at a time.

Workload: completion requests of PROMPT random token ids (seed per request, never the end-of-text id)
with max_tokens MAX_TOKENS, greedy (temperature 0), streamed with stream_options.include_usage; a
request's generated tokens are its usage.completion_tokens (a request may stop early at an
end-of-text token; the count is what was generated). Phases:

- 1 client: REQUESTS_1 requests one after another;
- 16 clients: REQUESTS_16 requests, 16 in flight at all times (16 asyncio workers on one queue).

Throughput of a phase = its generated tokens / its wall time (first send to last [DONE]). A round runs
both phases on each backend, interleaved: backends in turn (torch first in even rounds, ONNX Runtime
first in odd ones), and on each 1 then 16 clients in even rounds, 16 then 1 in odd ones, so slow drift
cancels; the ratio of a round is its 16-client tokens/s over its 1-client tokens/s, and the figure
judged is the ratio of the medians over rounds, per backend. Latency: send to [DONE]; time to first token: send to the first event with text;
p50 / p99 over all requests of a phase kind, all rounds pooled. The decode batch size is the server's
own figure (the llmctl_decode_batch_size histogram of /metrics: sum / count over the phase); its CPU
time per token (all its threads, from /proc, median over rounds) is steadier than tokens/s when other
processes share the cores.

Targets: 16-client tokens/s >= 5x 1-client tokens/s on the tiny model (issue 6, torch), and the
ONNX Runtime backend scaling at least as the torch one does (issue 16).

Absolute figures are context only: the clients share the machine's cores with the servers (run it
under `taskset -c 0,1` for a 2-core figure on a bigger machine), and another busy process slows
PyTorch many times over (shared/NOTES.md); the ratios are measured in the same run, on the same
servers. The CPU model and the cores this process may use are printed with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SEED = 0
TINY = {"family": "gpt", "n_layer": 4, "n_head": 4, "d_model": 128, "context_length": 128, "dropout": 0.0}
VOCAB = 4096
TOKENIZER_TEXT_BYTES = 2_000_000
TARGET_RATIO = 5.0
BACKENDS = ("torch", "onnxruntime")


# --------------------------------------------------------------------------- the model


def random_model_dir(dest: Path) -> Path:
    """A tiny-gpt-shaped model dir with random weights and a stdlib-trained tokenizer."""
    import torch

    from llmctl.data.tokenizer import DEFAULT_EOT, train_tokenizer
    from llmctl.models.model_dir import save_model_dir
    from llmctl.models.registry import build_model

    texts, size = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        texts.append(text)
        size += len(text)
        if size >= TOKENIZER_TEXT_BYTES:
            break
    tokenizer = train_tokenizer(texts, vocab_size=VOCAB, min_frequency=2, special_tokens=[DEFAULT_EOT])
    tok_path = dest.parent / "tokenizer.json"
    tokenizer.save(str(tok_path))
    torch.manual_seed(SEED)
    model = build_model({**TINY, "vocab_size": VOCAB})
    save_model_dir(model, dest, tokenizer_path=tok_path, provenance={"note": "bench_serve: random weights"})
    return dest


def onnx_export_dir(model_dir: Path, dest: Path) -> Path:
    """The fp32 ONNX export of `model_dir` (verified against PyTorch, as `llmctl export` does)."""
    from llmctl.tasks.lm.export import export_onnx
    from llmctl.models.model_dir import load_model_dir

    report = export_onnx(load_model_dir(model_dir), dest)
    if not report.passed:
        raise SystemExit(f"bench_serve: the ONNX export of {model_dir} failed its parity check")
    return dest


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), and how many cores this process may run on."""
    name = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{name}, {usable} of {os.cpu_count()} cores usable"


# --------------------------------------------------------------------------- the server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir: Path, log_path: Path, threads: int | None) -> tuple[subprocess.Popen, str]:
    import httpx

    port = free_port()
    env = dict(os.environ, NO_COLOR="1")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "llmctl", "serve", str(model_dir), "--port", str(port)],
                                cwd=str(ROOT), env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"bench_serve: the server exited {proc.returncode}:\n{log_path.read_text()}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"bench_serve: the server was not ready within 120 s:\n{log_path.read_text()}")


def server_cpu_s(pid: int) -> float | None:
    """CPU seconds the server process has used, all its threads (Linux /proc; None elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def server_figure(url: str, name: str) -> float:
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        for s in family.samples:
            if s.name == name and not s.labels:
                return s.value
    return 0.0


# --------------------------------------------------------------------------- the clients


def make_requests(n: int, prompt_len: int, max_tokens: int, vocab: int, eot: int, salt: int) -> list[dict]:
    out = []
    for i in range(n):
        rng = random.Random(SEED * 1_000_003 + salt * 10_007 + i)
        ids = [rng.randrange(vocab) for _ in range(prompt_len)]
        ids = [t if t != eot else (t + 1) % vocab for t in ids]
        out.append({"prompt": ids, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                    "stream_options": {"include_usage": True}})
    return out


FIRST_TEXT = re.compile(rb'"text":"[^"]')
COMPLETION_TOKENS = re.compile(rb'"completion_tokens":(\d+)')


async def one_request(host: str, port: int, body: dict) -> dict:
    """One streamed request over a raw socket: the clients share the machine's CPUs with the server, so
    they read bytes and look only for the first text, the usage event and [DONE] (no HTTP library, no
    JSON parsing of each event)."""
    payload = json.dumps(body).encode()
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\nConnection: close\r\n\r\n" % (host.encode(), len(payload)) + payload)
    first = None
    tail = b""
    received = bytearray()
    while True:
        data = await reader.read(1 << 16)
        if not data:
            break
        received += data
        if first is None and FIRST_TEXT.search(tail + data):
            first = time.perf_counter()
        tail = (tail + data)[-64:]
    done = time.perf_counter()
    writer.close()
    if not received.startswith(b"HTTP/1.1 200") or b"data: [DONE]" not in received[-64:]:
        raise SystemExit(f"bench_serve: bad response: {bytes(received[:300])!r} ... {bytes(received[-300:])!r}")
    usage = COMPLETION_TOKENS.findall(bytes(received[-400:]))
    return {"latency_s": done - t0, "ttft_s": (first or done) - t0, "tokens": int(usage[-1]) if usage else 0}


async def run_phase(url: str, requests: list[dict], clients: int, pid: int | None = None) -> dict:
    host, port = url.removeprefix("http://").split(":")
    queue: asyncio.Queue = asyncio.Queue()
    for body in requests:
        queue.put_nowait(body)
    results: list[dict] = []

    async def worker() -> None:
        while True:
            try:
                body = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            results.append(await one_request(host, int(port), body))

    steps0 = server_figure(url, "llmctl_decode_batch_size_count")
    rows0 = server_figure(url, "llmctl_decode_batch_size_sum")
    server0 = server_cpu_s(pid) if pid else None
    cpu0, t0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    server1 = server_cpu_s(pid) if pid else None
    steps = server_figure(url, "llmctl_decode_batch_size_count") - steps0
    rows = server_figure(url, "llmctl_decode_batch_size_sum") - rows0
    tokens = sum(r["tokens"] for r in results)
    return {
        "clients": clients, "requests": len(results), "tokens": tokens, "elapsed_s": elapsed,
        "tokens_per_s": tokens / elapsed, "client_cpu_s": cpu,
        "server_cpu_ms_per_token": (1000 * (server1 - server0) / tokens
                                    if server0 is not None and server1 is not None and tokens else None),
        "mean_decode_batch": rows / steps if steps else None,
        "latency_s": [r["latency_s"] for r in results], "ttft_s": [r["ttft_s"] for r in results],
    }


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


# --------------------------------------------------------------------------- driver


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", choices=(*BACKENDS, "both"), default="both", help="which servers to measure")
    ap.add_argument("--model-dir", type=Path, default=None, help="serve this model dir (default: random tiny-gpt)")
    ap.add_argument("--rounds", type=int, default=None, help="rounds of both phases (default 3, quick 2)")
    ap.add_argument("--requests-1", type=int, default=None, help="1-client requests per round (default 12, quick 6)")
    ap.add_argument("--requests-16", type=int, default=None, help="16-client requests per round (default 64, quick 32)")
    ap.add_argument("--prompt-tokens", type=int, default=16, help="prompt length (tokens)")
    ap.add_argument("--max-tokens", type=int, default=96, help="max_tokens of each request")
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the server (default: torch's own)")
    ap.add_argument("--quick", action="store_true", help="fewer rounds and requests")
    ap.add_argument("--out", type=Path, default=None, help="also write the figures as JSON here")
    args = ap.parse_args()
    q = args.quick
    rounds = args.rounds or (2 if q else 3)
    n1 = args.requests_1 or (6 if q else 12)
    n16 = args.requests_16 or (32 if q else 64)
    backends = BACKENDS if args.backend == "both" else (args.backend,)
    t_start = time.perf_counter()
    load_before = os.getloadavg()

    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        if args.model_dir:
            model_dir, source = args.model_dir, str(args.model_dir)
        else:
            print("building a random tiny-gpt model dir ...", file=sys.stderr, flush=True)
            model_dir, source = random_model_dir(Path(tmp) / "model"), "random weights, tiny-gpt shape"
        dirs = {"torch": model_dir}
        if "onnxruntime" in backends:
            print("exporting it to ONNX ...", file=sys.stderr, flush=True)
            dirs["onnxruntime"] = onnx_export_dir(model_dir, Path(tmp) / "onnx")
        config = json.loads((model_dir / "config.json").read_text())
        from tokenizers import Tokenizer

        from llmctl.data.tokenizer import eot_id

        eot = eot_id(Tokenizer.from_file(str(model_dir / "tokenizer.json")))
        vocab = config["vocab_size"]
        if args.prompt_tokens + args.max_tokens > config["context_length"]:
            raise SystemExit(f"--prompt-tokens + --max-tokens must fit the context ({config['context_length']})")
        servers: dict[str, tuple[subprocess.Popen, str]] = {}
        codes: dict[str, int | None] = {}
        try:
            for backend in backends:
                servers[backend] = start_server(dirs[backend], Path(tmp) / f"serve-{backend}.log", args.threads)
            for backend in backends:  # warm-up: both phase shapes once, untimed
                url = servers[backend][1]
                asyncio.run(run_phase(url, make_requests(2, args.prompt_tokens, args.max_tokens, vocab, eot, 999), 1))
                asyncio.run(run_phase(url, make_requests(16, args.prompt_tokens, args.max_tokens, vocab, eot, 998), 16))
            phases: dict[str, dict[int, list[dict]]] = {b: {1: [], 16: []} for b in backends}
            for r in range(rounds):
                for backend in (backends if r % 2 == 0 else backends[::-1]):
                    for clients in ((1, 16) if r % 2 == 0 else (16, 1)):
                        n = n1 if clients == 1 else n16
                        reqs = make_requests(n, args.prompt_tokens, args.max_tokens, vocab, eot,
                                             salt=r * 2 + (clients > 1))
                        proc, url = servers[backend]
                        result = asyncio.run(run_phase(url, reqs, clients, proc.pid))
                        result["round"] = r
                        phases[backend][clients].append(result)
                        print(f"  round {r + 1}/{rounds} {backend:11s}: {clients:2d} client(s) "
                              f"{result['tokens_per_s']:8.1f} tok/s ({time.perf_counter() - t_start:4.0f} s)",
                              file=sys.stderr, flush=True)
        finally:
            for backend, (proc, _) in servers.items():
                proc.send_signal(signal.SIGTERM)
            for backend, (proc, _) in servers.items():
                try:
                    codes[backend] = proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    codes[backend] = None
        logs = {b: (Path(tmp) / f"serve-{b}.log").read_text() for b in backends}

    report = {
        "model": source,
        "model_shape": {k: config.get(k) for k in ("n_layer", "n_head", "d_model", "context_length", "vocab_size")},
        "workload": {"prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens, "temperature": 0,
                     "stream": True, "server_threads": args.threads or "default"},
        "cpu": cpu_model(),
        "rounds": rounds,
        "order": "one server per backend for the whole run; each round runs the backends in turn (the other first "
                 "in odd rounds), and on each 1 then 16 clients (16 then 1 in odd rounds)",
        "backends": {b: summarize(phases[b], rounds, logs[b], codes[b]) for b in backends},
        "target_ratio": TARGET_RATIO,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "elapsed_s": time.perf_counter() - t_start,
    }
    if len(backends) == 2:
        report["onnxruntime_over_torch_16_clients"] = (
            report["backends"]["onnxruntime"]["sixteen_clients"]["median_tokens_per_s"]
            / report["backends"]["torch"]["sixteen_clients"]["median_tokens_per_s"])
    print_table(report)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


def summarize(phases: dict[int, list[dict]], rounds: int, server_log: str, code: int | None) -> dict:
    """One backend's figures: both phase kinds, the ratio of medians and of each round."""
    def kind(clients: int) -> dict:
        runs = phases[clients]
        lat = [x for r in runs for x in r["latency_s"]]
        ttft = [x for r in runs for x in r["ttft_s"]]
        return {
            "clients": clients,
            "tokens_per_s": [r["tokens_per_s"] for r in runs],
            "median_tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs),
            "requests_per_round": runs[0]["requests"],
            "mean_tokens_per_request": sum(r["tokens"] for r in runs) / sum(r["requests"] for r in runs),
            "latency_p50_s": percentile(lat, 0.5), "latency_p99_s": percentile(lat, 0.99),
            "ttft_p50_s": percentile(ttft, 0.5), "ttft_p99_s": percentile(ttft, 0.99),
            "mean_decode_batch": [r["mean_decode_batch"] for r in runs],
            "client_cpu_s": [r["client_cpu_s"] for r in runs],
            "server_cpu_ms_per_token": _median_known(r["server_cpu_ms_per_token"] for r in runs),
        }

    one, many = kind(1), kind(16)
    round_ratios = [
        next(x["tokens_per_s"] for x in phases[16] if x["round"] == r)
        / next(x["tokens_per_s"] for x in phases[1] if x["round"] == r)
        for r in range(rounds)
    ]
    return {
        "one_client": one,
        "sixteen_clients": many,
        "ratio": many["median_tokens_per_s"] / one["median_tokens_per_s"],
        "round_ratios": round_ratios,
        "server": [line for line in server_log.splitlines() if line.startswith(("serving", "ready"))],
        "server_exit_after_sigterm": code,
    }


def _median_known(xs: Any) -> float | None:
    known = [x for x in xs if x is not None]
    return statistics.median(known) if known else None


def print_table(rep: dict) -> None:
    shape, w = rep["model_shape"], rep["workload"]
    print()
    print(f"llmctl serve throughput, 1 vs 16 concurrent clients on one server per backend ({rep['rounds']} rounds)")
    print(f"  CPU: {rep['cpu']}")
    print(f"  model: {rep['model']}: gpt {shape['n_layer']}L d{shape['d_model']} h{shape['n_head']} "
          f"ctx{shape['context_length']} vocab {shape['vocab_size']}")
    print(f"  requests: {w['prompt_tokens']} prompt tokens, max_tokens {w['max_tokens']}, greedy, streamed; "
          f"server threads: {w['server_threads']}")
    print(f"  order: {rep['order']}")
    print(f"  load average (1 min) before {rep['load_average_before'][0]:.2f}, after {rep['load_average_after'][0]:.2f}; "
          f"total {rep['elapsed_s']:.0f} s")
    print()
    head = (f"{'backend':>11s} {'clients':>7s} {'tok/s (median)':>14s} {'per round':>24s} {'tok/req':>7s} {'batch':>5s} "
            f"{'lat p50':>8s} {'lat p99':>8s} {'TTFT p50':>8s} {'TTFT p99':>8s} {'srv CPU/tok':>11s}")
    print(head)
    print("-" * len(head))
    for backend, b in rep["backends"].items():
        for k in (b["one_client"], b["sixteen_clients"]):
            per = " ".join(f"{x:.0f}" for x in k["tokens_per_s"])
            batch = statistics.mean(x for x in k["mean_decode_batch"] if x is not None)
            print(f"{backend:>11s} {k['clients']:7d} {k['median_tokens_per_s']:14.1f} {per:>24s} "
                  f"{k['mean_tokens_per_request']:7.1f} {batch:5.1f} {1000 * k['latency_p50_s']:6.0f}ms "
                  f"{1000 * k['latency_p99_s']:6.0f}ms {1000 * k['ttft_p50_s']:6.1f}ms {1000 * k['ttft_p99_s']:6.1f}ms "
                  f"{_ms(k['server_cpu_ms_per_token']):>11s}")
    print()
    for backend, b in rep["backends"].items():
        rr = " ".join(f"{x:.2f}" for x in b["round_ratios"])
        verdict = "meets" if b["ratio"] >= rep["target_ratio"] else "is BELOW"
        print(f"RESULT {backend}: 16 clients / 1 client = {b['ratio']:.2f}x tokens/s (ratio of medians; per round "
              f"{rr}): {verdict} the target {rep['target_ratio']}x; {' / '.join(b['server'])}; exit after SIGTERM "
              f"{b['server_exit_after_sigterm']}")
    if "onnxruntime_over_torch_16_clients" in rep:
        print(f"RESULT onnxruntime / torch at 16 clients: {rep['onnxruntime_over_torch_16_clients']:.2f}x tokens/s")


def _ms(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}ms"


if __name__ == "__main__":
    main()
