#!/usr/bin/env python
"""`make demo`'s serving step: start `llmctl serve` on a free loopback port, send it requests with the
`openai` client (a completion, then a streamed chat; for a classifier, texts to /v1/classify), print
the answers, and stop it with SIGTERM.

    python scripts/demo_serve.py MODEL_OR_EXPORT_DIR [...]

Each directory is served in turn. Exits non-zero if a server does not come up, a request fails, or a
server does not exit 0 after SIGTERM.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time

LISTENING = re.compile(r"listening on (http://\S+)")
READY_TIMEOUT_S = 120


def serve(path: str) -> tuple[subprocess.Popen, str]:
    """Start the server on port 0 (a free one) and wait until /health says the model is loaded."""
    import httpx

    proc = subprocess.Popen([sys.executable, "-m", "llmctl", "serve", path, "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    url = None
    for line in proc.stdout:
        print(f"  [serve] {line.rstrip()}")
        found = LISTENING.search(line)
        if found:
            url = found.group(1)
            break
    if url is None:
        raise SystemExit(f"demo_serve: `llmctl serve {path}` exited {proc.wait()} before listening")
    deadline = time.monotonic() + READY_TIMEOUT_S
    while httpx.get(f"{url}/health", timeout=5).status_code != 200:
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            raise SystemExit(f"demo_serve: {path} was not ready within {READY_TIMEOUT_S} s")
        time.sleep(0.2)
    return proc, url


SENTENCES = ["the plot was bad but the acting was great", "the music was good yet the story was not good"]


def classify(url: str, model: str) -> None:
    """A classifier answers POST /v1/classify (llmctl's own endpoint; the openai client has none)."""
    import httpx

    answer = httpx.post(f"{url}/v1/classify", json={"model": model, "input": SENTENCES}, timeout=60).json()
    print(f"  POST /v1/classify (model {model}, {len(SENTENCES)} texts):")
    for text, item in zip(SENTENCES, answer["data"]):
        print(f"    {item['label']:<10} {item['probabilities'][item['label']]:.3f}  {text}")


def ask(url: str) -> None:
    import httpx
    from openai import OpenAI

    card = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]
    if card.get("task") == "classification":
        classify(url, card["id"])
        return
    client = OpenAI(base_url=f"{url}/v1", api_key="unused")
    model = client.models.list().data[0].id
    prompt = "def fib(n):"
    completion = client.completions.create(model=model, prompt=prompt, max_tokens=40, temperature=0)
    print(f"  POST /v1/completions (model {model}, greedy, 40 tokens), usage {completion.usage.total_tokens} tokens:")
    print("    " + (prompt + completion.choices[0].text).replace("\n", "\n    "))
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Write a Python class for a stack."}],
        max_tokens=40, temperature=0.8, seed=0, stream=True,
    )
    pieces = [chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices]
    print(f"  POST /v1/chat/completions (streamed, {len(pieces)} events):")
    print("    " + "".join(pieces).replace("\n", "\n    "))


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=60)
    if code != 0:
        raise SystemExit(f"demo_serve: the server exited {code} after SIGTERM")
    print("  [serve] stopped by SIGTERM, exit 0")


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    for path in sys.argv[1:]:
        print(f"llmctl serve {path}")
        proc, url = serve(path)
        try:
            ask(url)
        finally:
            if proc.poll() is None:
                stop(proc)


if __name__ == "__main__":
    main()
