"""Benchmark of `prepare`: encode throughput against a plain loop, and peak memory against corpus size.

    .venv/bin/python benchmarks/bench_prepare.py [--mb 8] [--rounds 3] [--mem-mb 4] [--chunk-mb 1]

1. Encode speed. On the first --mb MB of builtin:stdlib, with a tokenizer trained once, each round runs
   A = llmctl's `encode_to_shards` (batched, parallel in Rust) and B = a plain loop of
   `tokenizer.encode(doc)` one document at a time with RAYON_NUM_THREADS=1, each in a fresh process,
   interleaved A B A B ... (another busy process on the machine slows both alike). Reading the
   documents is not timed. Reports the median MB/s of each and their ratio.
2. Memory. A full `prepare_dataset` on a synthesized corpus of --mem-mb MB and of 8x that, each in a
   fresh process that reports its own peak RSS (VmHWM); target ratio 8x/1x <= 1.5.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM"):
                return int(line.split()[1]) / 1024
    import resource  # not Linux: ru_maxrss is KB on Linux, bytes on macOS

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def stdlib_docs(mb: float):
    from llmctl.config.schema import DataConfig
    from llmctl.data.sources import SourceStats, iter_documents

    data = DataConfig(sources=["builtin:stdlib"], max_bytes=int(mb * 1_000_000))
    return list(iter_documents(data, SourceStats()))


# --- child processes --------------------------------------------------------------------------------


def child_encode(mode: str, mb: float, tokenizer_path: str, out_dir: str) -> dict:
    import numpy as np

    from llmctl.data.shards import document_split
    from llmctl.data.shards import encode_to_shards
    from llmctl.data.tokenizer import load_tokenizer, token_dtype

    docs = stdlib_docs(mb)
    tok = load_tokenizer(Path(tokenizer_path))
    dtype = token_dtype(tok.get_vocab_size())
    nbytes = sum(len(d.text.encode("utf-8")) for d in docs)
    t0 = time.perf_counter()
    if mode == "llmctl":
        counts = encode_to_shards(docs, tok, 0, document_split(0, 0.02), Path(out_dir), dtype, chunk_bytes=4_000_000)
        tokens = sum(c["tokens"] for c in counts.values())
    else:
        tokens = 0
        with open(Path(out_dir) / "plain.bin", "wb") as f:
            for doc in docs:
                ids = tok.encode(doc.text).ids
                if not doc.continues:
                    ids.append(0)
                np.array(ids, dtype=dtype).tofile(f)
                tokens += len(ids)
    seconds = time.perf_counter() - t0
    return {"mb_s": nbytes / 1e6 / seconds, "seconds": seconds, "tokens": tokens, "bytes": nbytes}


def child_prepare(corpus: str, out_dir: str, chunk_bytes: int) -> dict:
    from llmctl.config.schema import DataConfig
    from llmctl.data.prepare import prepare_dataset

    t0 = time.perf_counter()
    meta = prepare_dataset(DataConfig(sources=[corpus], chunk_bytes=chunk_bytes), Path(out_dir), seed=0).meta
    return {
        "peak_rss_mb": peak_rss_mb(),
        "seconds": time.perf_counter() - t0,
        "bytes": meta["sources"]["text_bytes"],
        "tokens": meta["splits"]["train"]["tokens"] + meta["splits"]["val"]["tokens"],
    }


def run_child(args: list[str], env: dict | None = None) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if done.returncode:
        sys.exit(f"child {args[0]} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- the synthesized corpus for the memory check ----------------------------------------------------


def write_corpus(root: Path, mb: float, files: int = 64, seed: int = 0) -> None:
    """Text files of sentences over a fixed made-up vocabulary: the 8x corpus varies the same words."""
    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "ne", "tu", "ra", "shi", "po", "vel", "dor", "an", "ix", "qu", "zé", "ø", "fa"]
    words = sorted({"".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(5000)})
    root.mkdir(parents=True)
    per_file = int(mb * 1_000_000 / files)
    for i in range(files):
        lines, n = [], 0
        while n < per_file:
            line = " ".join(rng.choices(words, k=rng.randint(3, 14))) + rng.choice([".\n", ",\n", "!\n", ".\n\n"])
            lines.append(line)
            n += len(line.encode())
        (root / f"doc{i:03d}.txt").write_text("".join(lines))


# --- the parent ---------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=8, help="MB of builtin:stdlib text to encode (default 8)")
    ap.add_argument("--rounds", type=int, default=3, help="A/B rounds (default 3)")
    ap.add_argument("--mem-mb", type=float, default=4, help="MB of the 1x corpus for the memory check (default 4)")
    ap.add_argument("--chunk-mb", type=float, default=1, help="data.chunk_bytes in MB for the memory check (default 1)")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:
        kind, *rest = args.child
        if kind == "prepare":
            result = child_prepare(rest[0], rest[1], int(rest[2]))
        else:
            result = child_encode(kind, float(rest[0]), rest[1], rest[2])
        print(json.dumps(result))
        return

    from llmctl.data.tokenizer import train_tokenizer

    with tempfile.TemporaryDirectory(prefix="bench-prepare-") as tmp:
        tmp = Path(tmp)
        print(f"training a 4096-token tokenizer on {args.mb:g} MB of builtin:stdlib ...", file=sys.stderr)
        tok = train_tokenizer((d.text for d in stdlib_docs(args.mb)), 4096, 2, ["<|endoftext|>"])
        tok.save(str(tmp / "tokenizer.json"))

        speeds: dict[str, list[float]] = {"llmctl": [], "loop": []}
        tokens: dict[str, int] = {}
        single = {"RAYON_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        for r in range(args.rounds):
            for mode in ("llmctl", "loop"):
                out = tmp / f"{mode}-{r}"
                out.mkdir()
                res = run_child([mode, str(args.mb), str(tmp / "tokenizer.json"), str(out)],
                                env=single if mode == "loop" else None)
                speeds[mode].append(res["mb_s"])
                tokens[mode] = res["tokens"]
                print(f"round {r + 1} {mode:6s} {res['mb_s']:6.2f} MB/s", file=sys.stderr)

        mem = {}
        for scale in (1, 8):
            corpus = tmp / f"corpus-{scale}x"
            write_corpus(corpus, args.mem_mb * scale)
            mem[scale] = run_child(["prepare", str(corpus), str(tmp / f"ds-{scale}x"), str(int(args.chunk_mb * 1e6))])
            print(f"prepare {scale}x: {mem[scale]['peak_rss_mb']:.0f} MB peak", file=sys.stderr)

    a, b = statistics.median(speeds["llmctl"]), statistics.median(speeds["loop"])
    ratio = mem[8]["peak_rss_mb"] / mem[1]["peak_rss_mb"]
    print()
    print(f"encode, {args.mb:g} MB of builtin:stdlib, vocab 4096, {os.cpu_count()} CPUs, "
          f"median of {args.rounds} interleaved rounds")
    for mode, label in (("llmctl", "llmctl encode_to_shards"), ("loop", "plain encode loop, 1 thread")):
        runs = ", ".join(f"{x:.2f}" for x in speeds[mode])
        median = statistics.median(speeds[mode])
        print(f"  {label:34s} {median:7.2f} MB/s   ({runs})  {tokens[mode]} tokens")
    print(f"  {'speedup':34s} {a / b:7.2f}x")
    print(f"prepare peak RSS, synthesized corpus, chunk_bytes {args.chunk_mb:g} MB")
    for scale in (1, 8):
        m = mem[scale]
        label = f"{scale}x ({m['bytes'] / 1e6:.1f} MB, {m['tokens']} tokens)"
        print(f"  {label:34s} {m['peak_rss_mb']:7.0f} MB    {m['seconds']:.1f} s")
    print(f"  {'ratio 8x / 1x (target <= 1.5)':34s} {ratio:7.2f}   {'ok' if ratio <= 1.5 else 'OVER TARGET'}")


if __name__ == "__main__":
    main()
