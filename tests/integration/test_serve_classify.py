"""`llmctl serve` of a classifier as a user runs it: the real command in a subprocess on a free loopback port,
over the sentiment recipe trained (briefly) once for the module, answering POST /v1/classify.

Two epochs at lr 1e-2 reach val macro-F1 1.0 on the built-in data set (seed 0), so the labels of sentences
written from its vocabulary follow its rule: the last clause's adjective, flipped by a "not" before it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from tests.conftest import REPO_ROOT
from tests.integration.conftest import assert_clean_failure, run_cli
from tests.integration.test_serve import Server, assert_error, metric

# (text, the label the data set's rule gives it)
SENTENCES = [
    ("the plot was bad but the acting was great", "positive"),
    ("the plot was good but the acting was not great", "negative"),
    ("the music was not bad, yet the ending was dull", "negative"),
    ("the cast is terrible though the story was really excellent overall", "positive"),
    ("the ending felt not good whereas the script was not boring", "positive"),
    ("honestly the pacing was great although the dialogue seemed not good", "negative"),
]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """runs/sentiment-rnn/model: the shipped sentiment recipe, trained for two epochs."""
    root = tmp_path_factory.mktemp("serve-classify")
    shutil.copy(REPO_ROOT / "recipes" / "sentiment-rnn.yaml", root / "sentiment-rnn.yaml")
    run_cli(root, "train", "sentiment-rnn.yaml", "train.epochs=2", "train.lr=1e-2", timeout=600)
    return root


@pytest.fixture(scope="module")
def server(workdir: Path) -> Iterator[Server]:
    srv = Server(workdir, "runs/sentiment-rnn/model").wait_ready()
    yield srv
    assert srv.terminate() == 0, srv.log()


def classify(url: str, body: dict, **kw) -> httpx.Response:
    return httpx.post(f"{url}/v1/classify", json=body, timeout=60, **kw)


def test_the_server_says_it_serves_a_classifier_and_health_goes_503_then_200(server: Server) -> None:
    assert server.health_seen[0] == 503 and server.health_seen[-1] == 200
    log = server.log()
    assert "serving sentiment-rnn (a classifier: negative, positive; torch fp32)" in log
    assert "POST /v1/classify" in log and "ready in" in log and "texts cut to 32 tokens" in log
    card = httpx.get(f"{server.url}/v1/models").json()["data"][0]
    assert card["id"] == "sentiment-rnn" and card["task"] == "classification"
    assert card["labels"] == ["negative", "positive"] and card["max_model_len"] == 32


def test_classify_labels_sentences_by_the_data_sets_rule_alone_and_in_a_batch(server: Server) -> None:
    texts = [t for t, _ in SENTENCES]
    r = classify(server.url, {"model": "sentiment-rnn", "input": texts})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "classification" and body["model"] == "sentiment-rnn"
    assert [d["label"] for d in body["data"]] == [label for _, label in SENTENCES], body["data"]
    for item in body["data"]:
        assert sum(item["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        assert item["probabilities"][item["label"]] > 0.5
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] >= len(texts) * 8
    for i, text in enumerate(texts):
        alone = classify(server.url, {"input": text}).json()["data"][0]
        assert alone["label"] == body["data"][i]["label"]
        assert alone["probabilities"] == pytest.approx(body["data"][i]["probabilities"], abs=2e-6)


def test_concurrent_clients_get_their_own_answers(server: Server) -> None:
    texts = [t for t, _ in SENTENCES]
    bodies = [{"input": [texts[i % len(texts)], texts[(i + 1) % len(texts)]]} for i in range(24)]
    sequential = [classify(server.url, b).json()["data"] for b in bodies[:6]]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda b: classify(server.url, b), bodies))
    for i, r in enumerate(answers):
        assert r.status_code == 200, r.text
        expected = sequential[i % 6]
        assert [d["label"] for d in r.json()["data"]] == [d["label"] for d in expected]
        for got, want in zip(r.json()["data"], expected):
            assert got["probabilities"] == pytest.approx(want["probabilities"], abs=2e-6)


def test_generation_endpoints_and_bad_input_get_400s_and_metrics_count_them(server: Server) -> None:
    before_ok = metric(server.url, "llmctl_requests_total", endpoint="/v1/classify", status="200")
    before_texts = metric(server.url, "llmctl_classified_texts_total")
    error = assert_error(httpx.post(f"{server.url}/v1/completions", json={"prompt": "the plot"}), 400)
    assert error["code"] == "wrong_endpoint" and "/v1/classify" in error["message"]
    chat = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert assert_error(chat, 400)["code"] == "wrong_endpoint"
    blank = classify(server.url, {"input": ["the plot was good", " "]})
    assert "input[1]" in assert_error(blank, 400, "input")["message"]
    assert_error(classify(server.url, {"input": []}), 400, "input")
    assert_error(classify(server.url, {"input": 3}), 400, "input")
    # curl's form-labelled JSON works here too.
    r = httpx.post(f"{server.url}/v1/classify", content=json.dumps({"input": SENTENCES[0][0]}),
                   headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 200 and r.json()["data"][0]["label"] == "positive"
    assert metric(server.url, "llmctl_requests_total", endpoint="/v1/classify", status="200") == before_ok + 1
    assert metric(server.url, "llmctl_requests_total", endpoint="/v1/classify", status="400") >= 3
    assert metric(server.url, "llmctl_requests_total", endpoint="/v1/completions", status="400") >= 1
    assert metric(server.url, "llmctl_classified_texts_total") == before_texts + 1


def test_the_model_kind_is_read_from_config_json_without_importing_torch(workdir: Path) -> None:
    code = ("import sys; from llmctl.serving.model_info import inspect_model; "
            "info = inspect_model('runs/sentiment-rnn/model', 'fp32'); "
            "print(info.spec.labels, info.context_length, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=workdir, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "('negative', 'positive') 32 False"


def test_language_model_flags_on_a_classifier_exit_2_before_listening(workdir: Path) -> None:
    for flags in (["--max-batch-size", "4"], ["--max-tokens-limit", "8", "--max-batch-size", "16"]):
        proc = run_cli(workdir, "serve", "runs/sentiment-rnn/model", "--port", "0", *flags, check=False, timeout=60)
        assert_clean_failure(proc, 2, "for language models", "is a classifier", flags[0])
        assert "listening" not in proc.stderr


def test_an_api_key_guards_classify_and_sigterm_exits_0(workdir: Path) -> None:
    srv = Server(workdir, "runs/sentiment-rnn/model", env={"LLMCTL_API_KEY": "s3cret"}).wait_ready()
    try:
        assert_error(classify(srv.url, {"input": "the plot was great"}), 401)
        ok = classify(srv.url, {"input": "the plot was great"}, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200, ok.text
    finally:
        code = srv.terminate()
    assert code == 0, srv.log()
    assert "SIGTERM" in srv.log() and "stopped" in srv.log()


def test_an_onnx_export_of_the_classifier_serves_the_same_labels_and_its_int8_graph_serves_too(workdir: Path) -> None:
    export = run_cli(workdir, "export", "runs/sentiment-rnn/model", "-o", "out/onnx", "--quantize", "int8",
                     check=False, timeout=600)
    assert export.returncode == 0, export.stderr
    texts = [t for t, _ in SENTENCES]
    srv = Server(workdir, "out/onnx").wait_ready()
    try:
        r = classify(srv.url, {"input": texts})
        assert r.status_code == 200, r.text
        assert [d["label"] for d in r.json()["data"]] == [label for _, label in SENTENCES]
        assert "onnxruntime" in srv.log()
    finally:
        assert srv.terminate() == 0, srv.log()
    srv = Server(workdir, "out/onnx", "--graph", "int8").wait_ready()
    try:
        r = classify(srv.url, {"input": texts})
        assert r.status_code == 200, r.text
        assert {d["label"] for d in r.json()["data"]} <= {"negative", "positive"}
        assert "(a classifier: negative, positive; onnxruntime int8)" in srv.log(), srv.log()
    finally:
        assert srv.terminate() == 0, srv.log()
