"""The HTTP layer of `llmctl serve` in-process, over a scripted engine: wire shapes, text stop strings,
streaming, every refusal as an OpenAI error object, auth, the queue, metrics, chat templates; and
/v1/classify over a tiny untrained classifier with its real runner thread.

The real engine and the real `llmctl serve` process are covered by tests/integration/test_serve.py.
"""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any, Callable

import pytest
from fastapi.testclient import TestClient

from llmctl.errors import LlmctlError
from llmctl.serving.api import create_app
from llmctl.serving.classify import ClassifierRunner, ClassifierSpec
from llmctl.serving.chat import DEFAULT_CHAT_TEMPLATE, ChatTemplate, ChatTemplateError, chat_template_of
from llmctl.serving.decoding import ChoiceStats, IncrementalDetokenizer, StopStrings, choice_pieces
from llmctl.serving.engine import GenerationRequest, TokenEvent
from llmctl.serving.metrics import ServerMetrics
from llmctl.serving.protocol import MAX_CLASSIFY_CHARS, MAX_CLASSIFY_TEXTS
from llmctl.serving.runner import QueueFull, QueueFull as ClassifierQueueFull, Stopped as RunnerStopped
from llmctl.serving.server import bind_socket
from llmctl.serving.state import ServingState
from tests.conftest import generated_text

CONTEXT = 64


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from llmctl.data.tokenizer import train_tokenizer

    return train_tokenizer(generated_text(400).splitlines(), vocab_size=300, min_frequency=1,
                           special_tokens=["<|endoftext|>"])


class FakeHandle:
    def __init__(self, events: list[TokenEvent]):
        self._events = events
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True

    async def events(self):
        for event in self._events:
            if self.cancelled:
                yield TokenEvent(None, None, None, "cancelled")
                return
            await asyncio.sleep(0)
            yield event


class FakeEngine:
    """Answers each request with the token ids `script(request)` gives, then "length"; logprobs made up."""

    def __init__(self, script: Callable[[GenerationRequest], list[int]], *, capacity: int = 100):
        self.script, self.capacity = script, capacity
        self.requests: list[GenerationRequest] = []
        self.handles: list[FakeHandle] = []
        self.queue_depth = 0
        self.batch_size = 0
        self.max_queue = 64

    def submit(self, request: GenerationRequest) -> FakeHandle:
        if len(self.requests) >= self.capacity:
            raise QueueFull("full")
        self.requests.append(request)
        ids = self.script(request)[: request.max_new_tokens]
        events = []
        for i, token in enumerate(ids):
            top = {token: -0.5, (token + 1) % 300: -1.5} if request.logprobs else None
            last = i == len(ids) - 1 and len(ids) == request.max_new_tokens
            events.append(TokenEvent(token, -0.5 if request.logprobs is not None else None, top,
                                     "length" if last else None))
        if len(ids) < request.max_new_tokens:
            events.append(TokenEvent(None, None, None, "stop"))
        handle = FakeHandle(events)
        self.handles.append(handle)
        return handle


def make_state(tokenizer: Any, engine: Any = None, **overrides: Any) -> ServingState:
    state = ServingState(
        model_name="tiny", tokenizer=tokenizer, eot_id=0, context_length=CONTEXT, vocab_size=300,
        max_tokens_limit=overrides.pop("max_tokens_limit", 48), metrics=ServerMetrics(),
        chat_template=overrides.pop("chat_template", chat_template_of({}, "config.json", "<|endoftext|>")), **overrides,
    )
    if engine is not None:
        state.engine, state.status = engine, "ready"
    return state


def ids_of(tokenizer: Any, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False).ids


@pytest.fixture
def serve(tokenizer: Any):
    """Factory: (TestClient, FakeEngine) for an app whose engine answers every request with `text`."""

    def make(text: str = " return value", **state_overrides: Any) -> tuple[TestClient, FakeEngine]:
        engine = FakeEngine(lambda r: ids_of(tokenizer, text), capacity=state_overrides.pop("capacity", 100))
        client = TestClient(create_app(make_state(tokenizer, engine, **state_overrides)), raise_server_exceptions=False)
        return client, engine

    return make


def sse_events(body: str) -> list[Any]:
    """The data of each server-sent event; "[DONE]" kept as the string."""
    events = []
    for block in body.split("\n\n"):
        if not block.strip():
            continue
        assert block.startswith("data: "), block
        data = block[len("data: "):]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


def assert_openai_error(response: Any, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param, error
    return error


# --------------------------------------------------------------------------- text from tokens


def test_detokenizer_never_splits_a_multibyte_character(tokenizer: Any) -> None:
    text = "naïve café = value\n    naïve"
    ids = ids_of(tokenizer, text)
    detok = IncrementalDetokenizer(tokenizer)
    pieces = [detok.push(i) for i in ids] + [detok.flush()]
    assert "".join(pieces) == tokenizer.decode(ids)
    assert not any("\ufffd" in p for p in pieces)


def test_detokenizer_lets_invalid_bytes_through_instead_of_stalling_the_stream(tokenizer: Any) -> None:
    lead_byte = tokenizer.token_to_id("\u00c3")  # byte 0xC3 alone: the start of a 2-byte character
    detok = IncrementalDetokenizer(tokenizer)
    pieces = [detok.push(lead_byte) for _ in range(8)]
    assert pieces[0] == ""  # still possibly incomplete: held
    assert any(pieces[: IncrementalDetokenizer.MAX_HELD]), pieces  # a run of lead bytes is invalid: sent
    assert "".join(pieces) + detok.flush() == tokenizer.decode([lead_byte] * 8)


def test_stop_strings_hold_back_what_could_grow_into_a_stop_and_find_the_earliest() -> None:
    stops = StopStrings(["\nclass", "xyz"])
    assert stops.held_back("def f\ncl") == 3
    assert stops.held_back("abx") == 1
    assert stops.held_back("abc") == 0
    assert stops.find("a xyz \nclass", 0) == 2
    assert stops.find("a xy", 0) is None


def _run_pieces(tokenizer: Any, text: str, stops: list[str]) -> tuple[list[Any], FakeHandle]:
    ids = ids_of(tokenizer, text)
    handle = FakeHandle([TokenEvent(t, None, None, None) for t in ids] + [TokenEvent(None, None, None, "length")])

    async def collect() -> list[Any]:
        return [p async for p in choice_pieces(handle, tokenizer, StopStrings(stops), started_at=0.0, stats=ChoiceStats())]

    return asyncio.run(collect()), handle


def test_a_stop_string_spanning_tokens_truncates_the_text_and_cancels_the_request(tokenizer: Any) -> None:
    pieces, handle = _run_pieces(tokenizer, "def value(self): return value", ["): ret"])
    assert "".join(p.text for p in pieces) == "def value(self"
    assert pieces[-1].finish_reason == "stop" and handle.cancelled
    # Nothing sent before the cut ever carried a part of the stop string.
    assert all(")" not in p.text for p in pieces)


def test_without_a_stop_match_every_token_is_sent_and_the_engine_finish_reason_kept(tokenizer: Any) -> None:
    pieces, handle = _run_pieces(tokenizer, "def value(self): return value", ["zzz"])
    assert "".join(p.text for p in pieces) == "def value(self): return value"
    assert pieces[-1].finish_reason == "length" and not handle.cancelled
    assert sum(len(p.tokens) for p in pieces) == len(ids_of(tokenizer, "def value(self): return value"))


# --------------------------------------------------------------------------- chat templates


def test_the_default_chat_template_renders_roles_and_an_open_assistant_turn() -> None:
    template = ChatTemplate(DEFAULT_CHAT_TEMPLATE, source="default")
    text = template.render([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}])
    assert text == "System: Be brief.\n\nUser: hi\n\nAssistant:"


def test_a_hugging_face_style_template_from_config_json_is_used_with_eos_and_raise_exception() -> None:
    hf = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
          "<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
          "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    template = chat_template_of({"chat_template": hf}, "m/config.json", "<|endoftext|>")
    assert template.render([{"role": "user", "content": "hi"}]) == "<|user|>hi<|endoftext|><|assistant|>"
    with pytest.raises(ChatTemplateError, match="no system role"):
        template.render([{"role": "system", "content": "x"}])


def test_a_chat_template_cannot_escape_the_sandbox_and_a_broken_one_is_refused_at_load() -> None:
    sneaky = ChatTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}", source="evil")
    with pytest.raises(ChatTemplateError):
        sneaky.render([{"role": "user", "content": "x"}])
    with pytest.raises(LlmctlError, match="m/config.json chat_template"):
        chat_template_of({"chat_template": "{% for m in messages %}"}, "m/config.json", "")
    with pytest.raises(LlmctlError, match="must be a Jinja2 string"):
        chat_template_of({"chat_template": 3}, "m/config.json", "")


# --------------------------------------------------------------------------- the API


def test_completions_answer_in_openai_shape_with_usage_and_logprobs(serve, tokenizer: Any) -> None:
    client, engine = serve(" return value")
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": "def f():", "max_tokens": 30, "logprobs": 2,
                                             "temperature": 0, "seed": 7, "top_k": 5, "top_p": 0.9})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-") and body["model"] == "tiny"
    assert isinstance(body["created"], int)
    (choice,) = body["choices"]
    assert choice["text"] == " return value" and choice["index"] == 0 and choice["finish_reason"] == "stop"
    n_new = len(ids_of(tokenizer, " return value"))
    assert body["usage"] == {"prompt_tokens": len(ids_of(tokenizer, "def f():")), "completion_tokens": n_new,
                             "total_tokens": len(ids_of(tokenizer, "def f():")) + n_new}
    lp = choice["logprobs"]
    assert "".join(lp["tokens"]) == " return value" and len(lp["token_logprobs"]) == n_new
    assert all(len(top) == 2 for top in lp["top_logprobs"]) and lp["text_offset"][0] == 0
    (request,) = engine.requests
    assert (request.temperature, request.seed, request.top_k, request.top_p, request.logprobs) == (0, 7, 5, 0.9, 2)
    assert request.stop_ids == [0] and request.max_new_tokens == 30


def test_n_choices_are_n_engine_requests_with_distinct_seeds_and_every_prompt_form_works(serve) -> None:
    client, engine = serve(" x")
    r = client.post("/v1/completions", json={"prompt": ["def", "class"], "n": 2, "seed": 3, "max_tokens": 4})
    assert [c["index"] for c in r.json()["choices"]] == [0, 1, 2, 3]
    assert [q.seed for q in engine.requests] == [3, 4, 3, 4]
    for prompt in ([5, 6, 7], [[5, 6], [7]], "", [[]]):
        assert client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 2}).status_code == 200, prompt
    assert engine.requests[-1].prompt_ids == [0]  # an empty prompt starts after an end-of-text token


def test_stop_strings_cut_completions_and_chat_before_the_match(serve) -> None:
    client, engine = serve(" return value\nclass Stack")
    r = client.post("/v1/completions", json={"prompt": "def", "max_tokens": 30, "stop": ["\nclass", "zz"]})
    assert r.json()["choices"][0]["text"] == " return value"
    assert r.json()["choices"][0]["finish_reason"] == "stop" and engine.handles[-1].cancelled
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "stop": "value"})
    assert r.json()["choices"][0]["message"]["content"] == " return "


def test_chat_renders_the_template_and_answers_in_openai_shape(tokenizer: Any) -> None:
    template = ChatTemplate("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}", source="t")
    engine = FakeEngine(lambda r: ids_of(tokenizer, " ok"))
    client = TestClient(create_app(make_state(tokenizer, engine, chat_template=template)))
    r = client.post("/v1/chat/completions", json={
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        "logprobs": True, "top_logprobs": 1,
    })
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    (choice,) = body["choices"]
    assert choice["message"]["role"] == "assistant" and choice["message"]["content"] == " ok"
    assert choice["logprobs"]["content"][0]["top_logprobs"][0]["logprob"] == -0.5
    assert tokenizer.decode(engine.requests[0].prompt_ids) == "[system] be brief\n[user] hi\n"
    # No max_tokens: the rest of the context (capped by the server's limit) is the budget.
    assert engine.requests[0].max_new_tokens == min(48, CONTEXT - len(engine.requests[0].prompt_ids))
    assert engine.requests[0].logprobs == 1


def test_streams_are_server_sent_events_ending_in_done_with_a_usage_chunk(serve) -> None:
    client, _ = serve(" return value(self)")
    r = client.post("/v1/completions", json={"prompt": "def", "max_tokens": 30, "stream": True,
                                             "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks, usage = events[:-2], events[-2]
    assert "".join(c["choices"][0]["text"] for c in chunks) == " return value(self)"
    assert all(c["object"] == "text_completion" and c["usage"] is None for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] > 0

    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "stream": True})
    events = sse_events(r.text)
    assert events[-1] == "[DONE]" and all("usage" not in e for e in events[:-1])
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1]) == " return value(self)"
    assert events[-2]["choices"][0]["finish_reason"] == "stop" and events[-2]["object"] == "chat.completion.chunk"


BAD_REQUESTS = [
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, "temperature"),
    ("/v1/completions", {"prompt": "x", "temperature": -0.1}, "temperature"),
    ("/v1/completions", {"prompt": "x", "max_tokens": -1}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 49}, "max_tokens"),  # over --max-tokens-limit
    ("/v1/completions", {"prompt": "x", "max_tokens": True}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 2.5}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "n": 0}, "n"),
    ("/v1/completions", {"prompt": "x", "n": 17}, "n"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, "top_p"),
    ("/v1/completions", {"prompt": "x", "top_p": 1.5}, "top_p"),
    ("/v1/completions", {"prompt": "x", "top_k": 0}, "top_k"),
    ("/v1/completions", {"prompt": "x", "seed": -1}, "seed"),
    ("/v1/completions", {"prompt": "x", "logprobs": 21}, "logprobs"),
    ("/v1/completions", {"prompt": "x", "stop": 3}, "stop"),
    ("/v1/completions", {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ("/v1/completions", {"prompt": "x", "stop": ""}, "stop"),
    ("/v1/completions", {"prompt": "x", "stream": "yes"}, "stream"),
    ("/v1/completions", {"prompt": "x", "echo": True}, "echo"),
    ("/v1/completions", {"prompt": "x", "presence_penalty": 1.0}, "presence_penalty"),
    ("/v1/completions", {"prompt": 3}, "prompt"),
    ("/v1/completions", {"prompt": []}, "prompt"),
    ("/v1/completions", {"prompt": [1, 300]}, "prompt"),
    ("/v1/completions", {"prompt": [1] * 50, "max_tokens": 16}, "max_tokens"),  # prompt + max_tokens > context
    ("/v1/completions", {"prompt": [1] * CONTEXT}, "prompt"),  # no room left at all
    ("/v1/completions", {}, "prompt"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
    ("/v1/chat/completions", {"messages": "hi"}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logprobs": 3}, "logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 400}]}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools"),
]


@pytest.mark.parametrize("path,body,param", BAD_REQUESTS, ids=[f"{p[4:]}-{b}"[:60] for p, b, _ in BAD_REQUESTS])
def test_bad_parameters_get_a_400_openai_error_naming_the_parameter(serve, path: str, body: dict, param: str) -> None:
    client, engine = serve()
    assert_openai_error(client.post(path, json=body), 400, param)
    assert engine.requests == []


@pytest.mark.parametrize("raw,content_type", [(b"{\"prompt\": ", "application/json"), (b"[1, 2]", "application/json"),
                                              (b"", "application/json"), (b"prompt=x", "text/plain"),
                                              (b"{\"prompt\": \"x\", \"temperature\": NaN}", "application/json")])
def test_a_malformed_body_gets_a_400_openai_error(serve, raw: bytes, content_type: str) -> None:
    client, _ = serve()
    assert_openai_error(client.post("/v1/completions", content=raw, headers={"content-type": content_type}), 400)


def test_unknown_model_route_and_method_get_openai_errors(serve) -> None:
    client, _ = serve()
    assert_openai_error(client.post("/v1/completions", json={"model": "gpt-4", "prompt": "x"}), 404, "model")
    assert_openai_error(client.get("/v1/models/gpt-4"), 404, "model")
    assert client.get("/v1/models/tiny").json()["id"] == "tiny"
    assert_openai_error(client.get("/v1/nothing"), 404)
    assert_openai_error(client.get("/v1/completions"), 405)


def test_the_models_list_names_the_served_model(serve) -> None:
    client, _ = serve()
    body = client.get("/v1/models").json()
    assert body["object"] == "list" and [m["id"] for m in body["data"]] == ["tiny"]
    assert body["data"][0]["object"] == "model" and body["data"][0]["owned_by"] == "llmctl"


def test_an_api_key_is_required_on_v1_but_not_on_health_or_metrics(serve) -> None:
    client, _ = serve(api_key="s3cret")
    body = {"prompt": "x", "max_tokens": 2}
    assert_openai_error(client.post("/v1/completions", json=body), 401)["code"] == "invalid_api_key"
    assert_openai_error(client.post("/v1/completions", json=body, headers={"Authorization": "Bearer nope"}), 401)
    assert_openai_error(client.post("/v1/completions", json=body, headers={"Authorization": "s3cret"}), 401)
    assert_openai_error(client.get("/v1/models"), 401)
    # Auth is checked before the body is even parsed: no hint to an unauthenticated caller.
    assert_openai_error(client.post("/v1/completions", content=b"{", headers={"content-type": "application/json"}), 401)
    ok = client.post("/v1/completions", json=body, headers={"Authorization": "Bearer s3cret"})
    assert ok.status_code == 200, ok.text
    assert client.get("/health").status_code == 200 and client.get("/metrics").status_code == 200


def test_while_the_model_loads_health_and_generation_answer_503(tokenizer: Any) -> None:
    state = make_state(tokenizer)
    client = TestClient(create_app(state))
    assert client.get("/health").status_code == 503
    r = client.post("/v1/completions", json={"prompt": "x"})
    assert_openai_error(r, 503)["code"] == "model_loading"
    assert r.headers["retry-after"]
    state.engine, state.status = FakeEngine(lambda r: [5]), "ready"
    assert client.get("/health").json()["status"] == "ready"
    assert client.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}).status_code == 200


def test_a_full_queue_answers_503_with_retry_after_and_cancels_the_requests_already_queued(serve) -> None:
    client, engine = serve(capacity=2)
    r = client.post("/v1/completions", json={"prompt": "x", "n": 3, "max_tokens": 2})
    assert_openai_error(r, 503)["code"] == "queue_full"
    assert int(r.headers["retry-after"]) >= 1
    assert len(engine.handles) == 2 and all(h.cancelled for h in engine.handles)


def test_more_sequences_than_the_queue_holds_is_a_400_naming_n_and_ignore_eos_drops_the_stop_id(serve) -> None:
    client, engine = serve()
    engine.max_queue = 4
    r = client.post("/v1/completions", json={"prompt": ["x", "y"], "n": 3, "max_tokens": 2})
    assert assert_openai_error(r, 400, "n")["code"] == "too_many_sequences" and not engine.requests
    assert client.post("/v1/completions", json={"prompt": ["x", "y"], "n": 2, "max_tokens": 2}).status_code == 200
    assert client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, "ignore_eos": True}).status_code == 200
    assert engine.requests[-1].stop_ids == [] and engine.requests[0].stop_ids != []


def test_an_engine_error_is_a_500_server_error_or_an_error_event_never_a_crash(tokenizer: Any) -> None:
    class Failing(FakeEngine):
        def submit(self, request):
            handle = super().submit(request)
            handle._events = [TokenEvent(5, None, None, None), TokenEvent(None, None, None, "error", "boom")]
            return handle

    client = TestClient(create_app(make_state(tokenizer, Failing(lambda r: [5]))))
    error = assert_openai_error(client.post("/v1/completions", json={"prompt": "x"}), 500)
    assert error["type"] == "server_error" and "boom" in error["message"]
    events = sse_events(client.post("/v1/completions", json={"prompt": "x", "stream": True}).text)
    assert events[-1] == "[DONE]" and "boom" in events[-2]["error"]["message"]
    assert client.get("/health").status_code == 200


def _sample(text: str, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


def test_metrics_count_requests_by_endpoint_and_status_and_tokens(serve) -> None:
    client, _ = serve(" return value")
    before = client.get("/metrics").text
    client.post("/v1/completions", json={"prompt": "def", "max_tokens": 4})
    client.post("/v1/completions", json={"prompt": "def", "max_tokens": -4})
    after = client.get("/metrics").text
    ok = dict(endpoint="/v1/completions", status="200")
    bad = dict(endpoint="/v1/completions", status="400")
    assert _sample(after, "llmctl_requests_total", **ok) == _sample(before, "llmctl_requests_total", **ok) + 1
    assert _sample(after, "llmctl_requests_total", **bad) == _sample(before, "llmctl_requests_total", **bad) + 1
    assert _sample(after, "llmctl_completion_tokens_total") == 4
    assert _sample(after, "llmctl_prompt_tokens_total") > 0
    assert _sample(after, "llmctl_time_to_first_token_seconds_count") == 1
    assert _sample(after, "llmctl_time_per_output_token_seconds_count") == 3
    client.get("/no/such/path")
    assert _sample(client.get("/metrics").text, "llmctl_requests_total", endpoint="other", status="404") == 1


# --------------------------------------------------------------------------- bodies: the cap, the context, threads


def call_asgi(app: Any, chunks: Any, headers: dict[str, str], path: str = "/v1/completions") -> tuple[int, dict, int]:
    """One POST through the ASGI app with its body pulled from `chunks` (bytes, made only as the app reads,
    with no Content-Length unless `headers` give one, as a chunked body arrives): (status, JSON body, chunks read)."""
    pulled = 0
    sent: list[dict] = []
    done = False

    async def receive() -> dict:
        nonlocal pulled, done
        if not done:
            chunk = next(chunks, None)
            if chunk is not None:
                pulled += 1
                return {"type": "http.request", "body": chunk, "more_body": True}
            done = True
            return {"type": "http.request", "body": b"", "more_body": False}
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    asyncio.run(app(scope, receive, send))
    starts = [m for m in sent if m["type"] == "http.response.start"]
    assert len(starts) == 1, sent
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return starts[0]["status"], json.loads(body), pulled


def mib_chunks(n: int) -> Any:
    """n MiB of a JSON prompt, one MiB at a time (never all in memory)."""
    yield b'{"prompt": "'
    for _ in range(n):
        yield b"x" * 2**20


def test_a_body_without_content_length_is_refused_413_once_past_the_cap_and_the_rest_is_never_read(
    tokenizer: Any,
) -> None:
    from llmctl.serving.middleware import MAX_BODY_BYTES

    engine = FakeEngine(lambda r: [5])
    app = create_app(make_state(tokenizer, engine))
    status, body, pulled = call_asgi(app, mib_chunks(50), {"content-type": "application/json"})
    assert status == 413 and body["error"]["code"] == "body_too_large", body
    assert pulled == MAX_BODY_BYTES // 2**20 + 1  # read up to the first chunk past the cap, no further
    assert engine.requests == []
    # A Content-Length over the cap is refused before a byte is read.
    status, _, pulled = call_asgi(app, mib_chunks(50), {"content-length": str(50 * 2**20)})
    assert (status, pulled) == (413, 0)


def test_a_body_of_more_json_values_than_any_request_needs_is_refused_413_as_it_streams_in(tokenizer: Any) -> None:
    from llmctl.serving.middleware import MAX_BODY_SEPARATORS

    def token_ids(chunks: int) -> Any:  # 1 MiB of "1," per chunk: 2**19 values
        yield b'{"prompt": ['
        for _ in range(chunks):
            yield b"1," * 2**19

    engine = FakeEngine(lambda r: [5])
    app = create_app(make_state(tokenizer, engine))
    status, body, pulled = call_asgi(app, token_ids(15), {"content-type": "application/json"})
    assert status == 413 and f"more than {MAX_BODY_SEPARATORS:,} JSON values" in body["error"]["message"], body
    assert pulled == 2 and engine.requests == []  # the opening's colon and one chunk's commas pass the cap


def test_a_wrong_api_key_is_refused_before_the_body_is_read(tokenizer: Any) -> None:
    app = create_app(make_state(tokenizer, FakeEngine(lambda r: [5]), api_key="s3cret"))
    for auth in ({}, {"authorization": "Bearer nope"}):
        status, body, pulled = call_asgi(app, mib_chunks(50), {"content-type": "application/json", **auth})
        assert (status, body["error"]["code"], pulled) == (401, "invalid_api_key", 0)


class SpyTokenizer:
    """Wraps a tokenizer: records the length of each text it encodes and whether an event loop runs in the
    thread that asked."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.lengths: list[int] = []
        self.on_event_loop: list[bool] = []

    def encode(self, text: str, **kw: Any) -> Any:
        try:
            asyncio.get_running_loop()
            self.on_event_loop.append(True)
        except RuntimeError:
            self.on_event_loop.append(False)
        self.lengths.append(len(text))
        return self.tokenizer.encode(text, **kw)


def spied_server(tokenizer: Any, **overrides: Any) -> tuple[TestClient, ServingState, SpyTokenizer]:
    state = make_state(tokenizer, FakeEngine(lambda r: ids_of(tokenizer, " ok")), **overrides)
    spy = SpyTokenizer(state.prompts.plain)
    state.prompts.plain = spy
    state.prompts.tokenizer = SpyTokenizer(state.prompts.tokenizer)
    return TestClient(create_app(state), raise_server_exceptions=False), state, spy


def test_a_prompt_too_long_for_the_context_is_refused_before_it_is_tokenized(tokenizer: Any) -> None:
    client, state, spy = spied_server(tokenizer)
    limit = state.prompts.max_chars
    longest = max(len(t) for t in tokenizer.get_vocab())
    assert limit == CONTEXT * longest
    for body in ({"prompt": "x" * (limit + 1)}, {"prompt": ["def", "y" * (limit + 1)]}):
        error = assert_openai_error(client.post("/v1/completions", json=body), 400, "prompt")
        assert error["code"] == "context_length_exceeded" and f"{limit + 1:,} characters" in error["message"]
    assert all(n <= 3 for n in spy.lengths)  # only "def" was tokenized
    messages = [{"role": "user", "content": "z" * (limit + 1)}]
    error = assert_openai_error(client.post("/v1/chat/completions", json={"messages": messages}), 400, "messages")
    assert error["code"] == "context_length_exceeded" and state.prompts.tokenizer.lengths == []
    # Lists of token ids or of messages longer than the context are refused before their items are validated.
    for path, body in (("/v1/completions", {"prompt": [1] * (CONTEXT + 1)}),
                       ("/v1/completions", {"prompt": [[1], [1] * (CONTEXT + 1)]}),
                       ("/v1/chat/completions", {"messages": [{"role": "user"}] * (CONTEXT + 1)})):
        assert assert_openai_error(client.post(path, json=body), 400)["code"] == "context_length_exceeded"
    # Within the bound, the text is tokenized and the token count decides.
    error = assert_openai_error(client.post("/v1/completions", json={"prompt": "return " * 40}), 400)
    assert error["code"] == "context_length_exceeded" and spy.lengths[-1] == len("return " * 40)


def test_prompts_and_messages_are_tokenized_in_a_worker_thread_not_on_the_event_loop(tokenizer: Any) -> None:
    client, state, spy = spied_server(tokenizer)
    assert client.post("/v1/completions", json={"prompt": "def f():", "max_tokens": 2}).status_code == 200
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert spy.on_event_loop == [False] and state.prompts.tokenizer.on_event_loop == [False]


# --------------------------------------------------------------------------- text that is not valid Unicode

LONE_SURROGATE = "caf\ud800e"

SURROGATES = [  # (path, body, the field as the message names it, as `param` names it)
    ("/v1/completions", {"prompt": LONE_SURROGATE}, "prompt", "prompt"),
    ("/v1/completions", {"prompt": ["ok", LONE_SURROGATE]}, "prompt[1]", "prompt.1"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": LONE_SURROGATE}]}, "messages[0].content",
     "messages.0.content"),
    ("/v1/chat/completions", {"messages": [{"role": "system", "content": "hi"},
                                           {"role": "user", "content": [{"type": "text", "text": LONE_SURROGATE}]}]},
     "messages[1].content[0].text", "messages.1.content.0.text"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi", "name": LONE_SURROGATE}]},
     "messages[0].name", "messages.0.name"),
]


def raw_json(body: dict) -> bytes:
    """The body as JSON with \\uXXXX escapes (a lone surrogate can only be sent so)."""
    return json.dumps(body, ensure_ascii=True).encode()


@pytest.mark.parametrize("path,body,where,param", SURROGATES, ids=[w for _, _, w, _ in SURROGATES])
def test_a_lone_surrogate_is_a_400_naming_the_field(serve, path: str, body: dict, where: str, param: str) -> None:
    client, engine = serve()
    r = client.post(path, content=raw_json(body), headers={"content-type": "application/json"})
    error = assert_openai_error(r, 400, param)
    assert error["message"].startswith(f"{where}: a lone surrogate (U+D800)"), error
    assert engine.requests == []


def test_a_lone_surrogate_in_a_text_to_classify_is_a_400_naming_it(classify_server) -> None:
    client, _, runner = classify_server()
    for body, param in (({"input": LONE_SURROGATE}, "input"), ({"input": ["ok", LONE_SURROGATE]}, "input.1")):
        r = client.post("/v1/classify", content=raw_json(body), headers={"content-type": "application/json"})
        assert "input" in assert_openai_error(r, 400, param)["message"]
    assert runner.queue_depth == 0


# --------------------------------------------------------------------------- the allow-list of request fields

MESSAGES = [{"role": "user", "content": "hi"}]
BASE = {"/v1/completions": {"prompt": "def", "max_tokens": 2}, "/v1/chat/completions": {"messages": MESSAGES, "max_tokens": 2}}
BOTH = tuple(BASE)
CHAT = ("/v1/chat/completions",)

# Fields that cannot change the output: accepted (and ignored), the engine request the same as without them.
HARMLESS = [
    *((p, "user", "u-1") for p in BOTH), *((p, "store", False) for p in BOTH),
    *((p, "metadata", {"k": "v"}) for p in BOTH), *((p, "service_tier", "auto") for p in BOTH),
    *((p, "prompt_cache_key", "k") for p in BOTH), *((p, "safety_identifier", "s") for p in BOTH),
    *((p, "stream_options", {"include_usage": False, "include_obfuscation": False}) for p in BOTH),
    *((p, "presence_penalty", 0) for p in BOTH), *((p, "frequency_penalty", 0.0) for p in BOTH),
    *((p, "logit_bias", {}) for p in BOTH), *((p, "stop", None) for p in BOTH),
    ("/v1/completions", "echo", False), ("/v1/completions", "best_of", 1), ("/v1/completions", "suffix", ""),
    ("/v1/chat/completions", "tools", []), ("/v1/chat/completions", "tool_choice", "none"),
    ("/v1/chat/completions", "tool_choice", "auto"), ("/v1/chat/completions", "parallel_tool_calls", True),
    ("/v1/chat/completions", "functions", []), ("/v1/chat/completions", "function_call", "none"),
    ("/v1/chat/completions", "response_format", {"type": "text"}), ("/v1/chat/completions", "modalities", ["text"]),
    ("/v1/chat/completions", "messages", [{"role": "user", "content": "hi"},
                                          {"role": "assistant", "content": "ok", "refusal": None, "tool_calls": [],
                                           "function_call": None, "audio": None, "annotations": []},
                                          {"role": "user", "content": "hi"}]),
]

# Fields llmctl does not honour, at values that would change the output: each a 400 naming the field.
REFUSED = [
    *((p, "repetition_penalty", 1.2, "repetition_penalty") for p in BOTH),
    *((p, "min_p", 0.1, "min_p") for p in BOTH), *((p, "min_tokens", 5, "min_tokens") for p in BOTH),
    *((p, "guided_json", {"type": "object"}, "guided_json") for p in BOTH),
    *((p, "guided_regex", "a+", "guided_regex") for p in BOTH),
    *((p, "guided_choice", ["a", "b"], "guided_choice") for p in BOTH),
    *((p, "grammar", "root ::= 'a'", "grammar") for p in BOTH),
    *((p, "use_beam_search", True, "use_beam_search") for p in BOTH),
    *((p, "length_penalty", 2.0, "length_penalty") for p in BOTH),
    *((p, "no_such_field", 1, "no_such_field") for p in BOTH),
    *((p, "presence_penalty", 0.5, "presence_penalty") for p in BOTH),
    *((p, "frequency_penalty", -1.0, "frequency_penalty") for p in BOTH),
    *((p, "logit_bias", {"5": 10.0}, "logit_bias") for p in BOTH),
    *((p, "stream_options", {"continuous_usage_stats": True}, "stream_options.continuous_usage_stats") for p in BOTH),
    ("/v1/completions", "echo", True, "echo"), ("/v1/completions", "best_of", 3, "best_of"),
    ("/v1/completions", "suffix", "}", "suffix"), ("/v1/completions", "messages", MESSAGES, "messages"),
    ("/v1/chat/completions", "prompt", "x", "prompt"),
    ("/v1/chat/completions", "functions", [{"name": "f", "parameters": {}}], "functions"),
    ("/v1/chat/completions", "function_call", {"name": "f"}, "function_call"),
    ("/v1/chat/completions", "function_call", "required", "function_call"),
    ("/v1/chat/completions", "tool_choice", "required", "tool_choice"),
    ("/v1/chat/completions", "tool_choice", {"type": "function", "function": {"name": "f"}}, "tool_choice"),
    ("/v1/chat/completions", "tools", [{"type": "function"}], "tools"),
    ("/v1/chat/completions", "response_format", {"type": "json_object"}, "response_format.type"),
    ("/v1/chat/completions", "modalities", ["text", "audio"], "modalities"),
    ("/v1/chat/completions", "audio", {"voice": "alloy", "format": "wav"}, "audio"),
    ("/v1/chat/completions", "reasoning_effort", "low", "reasoning_effort"),
    ("/v1/chat/completions", "verbosity", "low", "verbosity"),
    ("/v1/chat/completions", "web_search_options", {}, "web_search_options"),
    ("/v1/chat/completions", "prediction", {"type": "content", "content": "x"}, "prediction"),
    ("/v1/chat/completions", "messages", [{"role": "user", "content": "hi", "tool_call_id": "c1"}],
     "messages.0.tool_call_id"),
    ("/v1/chat/completions", "messages", [{"role": "assistant", "content": None, "refusal": "no"}],
     "messages.0.refusal"),
    ("/v1/chat/completions", "messages", [{"role": "assistant", "content": "x", "tool_calls": [{"id": "c"}]}],
     "messages.0.tool_calls"),
    ("/v1/chat/completions", "messages", [{"role": "user", "content": [{"type": "text", "text": "x", "cache": 1}]}],
     "messages.0.content"),
]


def _engine_view(request: GenerationRequest) -> tuple:
    return (request.prompt_ids, request.max_new_tokens, request.temperature, request.top_p, request.top_k,
            request.stop_ids, request.seed, request.logprobs)


@pytest.mark.parametrize("path,name,value", HARMLESS, ids=[f"{p[4:]}-{n}-{v}"[:50] for p, n, v in HARMLESS])
def test_a_field_that_cannot_change_the_output_is_accepted_and_changes_nothing(serve, path: str, name: str,
                                                                               value: Any) -> None:
    client, engine = serve()
    plain = client.post(path, json=BASE[path])
    given = client.post(path, json={**BASE[path], name: value})
    assert given.status_code == 200, given.text
    if name != "messages":
        assert _engine_view(engine.requests[1]) == _engine_view(engine.requests[0])
    assert plain.json()["choices"] == given.json()["choices"]


@pytest.mark.parametrize("path,name,value,param", REFUSED, ids=[f"{p[4:]}-{n}-{v}"[:50] for p, n, v, _ in REFUSED])
def test_a_field_that_would_change_the_output_unhonoured_is_a_400_naming_it(serve, path: str, name: str, value: Any,
                                                                            param: str) -> None:
    client, engine = serve()
    error = assert_openai_error(client.post(path, json={**BASE[path], name: value}), 400, param)
    assert error["message"].startswith(param.split(".")[0]), error
    assert engine.requests == []


def test_every_field_a_generation_endpoint_accepts_is_honoured_or_tested_above() -> None:
    from llmctl.serving.protocol import ChatCompletionRequest, CompletionRequest

    honoured = {"model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "ignore_eos", "n",
                "stop", "seed", "stream", "logprobs", "top_logprobs", "prompt", "messages"}
    tested = {name for _, name, _ in HARMLESS} | {name for _, name, _, _ in REFUSED}
    for model in (CompletionRequest, ChatCompletionRequest):
        untested = set(model.model_fields) - honoured - tested
        assert not untested, f"{model.__name__} accepts {sorted(untested)}: add them to HARMLESS or REFUSED"


def test_an_unknown_field_in_a_classify_body_is_a_400_naming_it(classify_server) -> None:
    client, _, _ = classify_server()
    assert client.post("/v1/classify", json={"input": "x", "user": "u", "metadata": {}}).status_code == 200
    error = assert_openai_error(client.post("/v1/classify", json={"input": "x", "temperature": 0.5}), 400, "temperature")
    assert error["code"] == "unknown_parameter"


# --------------------------------------------------------------------------- user text is text

EOT = "<|endoftext|>"


def test_a_special_token_string_in_a_prompt_is_encoded_as_plain_text(serve, tokenizer: Any) -> None:
    client, engine = serve()
    eot = tokenizer.token_to_id(EOT)
    assert client.post("/v1/completions", json={"prompt": f"def {EOT} f", "max_tokens": 2}).status_code == 200
    assert client.post("/v1/completions", json={"prompt": [f"x{EOT}", "y"], "max_tokens": 2}).status_code == 200
    ids = [r.prompt_ids for r in engine.requests]
    assert all(eot not in p for p in ids), ids
    assert tokenizer.decode(ids[0]) == f"def {EOT} f"  # the characters survive, as text
    assert client.post("/v1/completions", json={"prompt": [eot, 5], "max_tokens": 2}).status_code == 200
    assert engine.requests[-1].prompt_ids == [eot, 5]  # token ids are the way to send the token itself


def test_special_tokens_in_chat_come_only_from_the_template(tokenizer: Any) -> None:
    template = ChatTemplate("{% for m in messages %}{{ m['role'] }}: {{ m['content'] | trim }}{{ eos_token }}"
                            "{% endfor %}assistant:", source="t", eos_token=EOT)
    engine = FakeEngine(lambda r: ids_of(tokenizer, " ok"))
    client = TestClient(create_app(make_state(tokenizer, engine, chat_template=template)))
    eot = tokenizer.token_to_id(EOT)
    messages = [{"role": "system", "content": "be"}, {"role": "user", "content": f"  hi {EOT}x "}]
    r = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 2})
    assert r.status_code == 200, r.text
    ids = engine.requests[0].prompt_ids
    assert ids.count(eot) == 2  # the template's end of each turn; none from the user's text
    assert tokenizer.decode(ids, skip_special_tokens=False) == f"system: be{EOT}user: hi {EOT}x{EOT}assistant:"
    # Without special-token strings in the messages, the ids are the template's text encoded as prepare does.
    plain = [{"role": "user", "content": "def return value"}]
    client.post("/v1/chat/completions", json={"messages": plain, "max_tokens": 2})
    rendered = template.render(plain)
    assert engine.requests[1].prompt_ids == tokenizer.encode(rendered, add_special_tokens=False).ids


def test_binding_a_port_in_use_is_bad_input_naming_the_port() -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        with pytest.raises(LlmctlError, match=f"--port {port}: already in use"):
            bind_socket("127.0.0.1", port)
    finally:
        taken.close()


# --------------------------------------------------------------------------- /v1/classify

LABELS = ("negative", "neutral", "positive")
MAX_LEN = 12  # tokens per text the tiny classifier reads
TEXTS = ["def return value", "class self model", "for x in y : return 1", "token", "if x else y", "naïve café = 0"]


@pytest.fixture(scope="module")
def classifier() -> Any:
    """An untrained 3-class gru classifier (softmax head): its outputs differ by text, which is all these tests need."""
    import torch

    from llmctl.models.registry import build_model

    torch.manual_seed(0)
    config = {"family": "gru", "vocab_size": 300, "num_classes": 3, "d_model": 16, "labels": list(LABELS),
              "max_len": MAX_LEN, "pad_id": 0}
    return build_model(config).eval()


SPEC = ClassifierSpec(LABELS, MAX_LEN, 0)


def reference_probabilities(model: Any, tokenizer: Any, text: str) -> list[float]:
    """The text's probabilities from the model alone (B = 1, no padding), outside the server."""
    import torch

    from llmctl.models.classifiers import class_probabilities

    ids = ids_of(tokenizer, text)[:MAX_LEN]
    with torch.inference_mode():
        probs = class_probabilities(model(torch.tensor([ids]), torch.tensor([len(ids)])))
    return probs[0].tolist()


@pytest.fixture
def classify_server(tokenizer: Any, classifier: Any):
    """Factory: (TestClient, ServingState, ClassifierRunner) serving `model` (the tiny classifier by default)."""
    runners: list[ClassifierRunner] = []

    def make(model: Any = None, *, ready: bool = True, max_queue: int = 64, **overrides: Any):
        state = ServingState(
            model_name="sentiment", tokenizer=tokenizer, eot_id=0, context_length=MAX_LEN, vocab_size=300,
            max_tokens_limit=MAX_LEN, metrics=ServerMetrics(), classifier=SPEC, task="classification",
            chat_template=chat_template_of({}, "config.json", "<|endoftext|>"), **overrides,
        )
        runner = ClassifierRunner(classifier if model is None else model, max_texts=MAX_CLASSIFY_TEXTS,
                                  max_queue=max_queue, on_forward=state.metrics.on_forward)
        runner.start()
        runners.append(runner)
        if ready:
            state.metrics.bind_engine(runner)
            state.engine, state.status = runner, "ready"
        return TestClient(create_app(state), raise_server_exceptions=False), state, runner

    yield make
    for runner in runners:
        runner.stop(drain=False)


def test_classify_answers_each_text_with_its_argmax_label_and_probabilities_in_input_order(
    classify_server, tokenizer: Any, classifier: Any
) -> None:
    client, _, _ = classify_server()
    r = client.post("/v1/classify", json={"model": "sentiment", "input": TEXTS})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "classification" and body["model"] == "sentiment" and body["id"].startswith("classify-")
    assert isinstance(body["created"], int)
    assert [d["index"] for d in body["data"]] == list(range(len(TEXTS)))
    for text, item in zip(TEXTS, body["data"]):
        probs = item["probabilities"]
        assert list(probs) == list(LABELS)
        assert sum(probs.values()) == pytest.approx(1.0, abs=1e-5)
        assert item["label"] == max(probs, key=probs.get)
        assert list(probs.values()) == pytest.approx(reference_probabilities(classifier, tokenizer, text), abs=2e-6)
    assert len({tuple(d["probabilities"].values()) for d in body["data"]}) == len(TEXTS)  # the order is checkable
    tokens = sum(min(len(ids_of(tokenizer, t)), MAX_LEN) for t in TEXTS)
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}


def test_a_text_gets_the_same_answer_alone_and_in_a_padded_batch_and_is_cut_to_max_len(
    classify_server, tokenizer: Any
) -> None:
    client, _, _ = classify_server()
    long_text = " ".join(["return value"] * 20)  # far over MAX_LEN tokens
    batch = client.post("/v1/classify", json={"input": [*TEXTS, long_text]}).json()
    for i, text in enumerate([*TEXTS, long_text]):
        alone = client.post("/v1/classify", json={"input": text}).json()  # a bare string is one text
        assert len(alone["data"]) == 1 and alone["data"][0]["index"] == 0
        assert alone["data"][0]["label"] == batch["data"][i]["label"]
        assert list(alone["data"][0]["probabilities"].values()) == pytest.approx(
            list(batch["data"][i]["probabilities"].values()), abs=2e-6)
    cut = tokenizer.decode(ids_of(tokenizer, long_text)[:MAX_LEN])
    alone = client.post("/v1/classify", json={"input": long_text}).json()
    assert alone["usage"]["prompt_tokens"] == MAX_LEN
    assert alone["data"][0]["probabilities"] == pytest.approx(
        client.post("/v1/classify", json={"input": cut}).json()["data"][0]["probabilities"], abs=2e-6)


def test_a_binary_classifier_answers_both_probabilities_from_its_single_logit(classify_server, tokenizer: Any) -> None:
    import torch

    from llmctl.models.registry import build_model

    torch.manual_seed(1)
    model = build_model({"family": "rnn", "vocab_size": 300, "num_classes": 2, "d_model": 8}).eval()
    client, state, _ = classify_server(model)
    state.classifier = ClassifierSpec(("negative", "positive"), MAX_LEN, 0)
    data = client.post("/v1/classify", json={"input": TEXTS}).json()["data"]
    for text, item in zip(TEXTS, data):
        p = item["probabilities"]
        assert list(p) == ["negative", "positive"] and p["negative"] + p["positive"] == pytest.approx(1.0, abs=1e-5)
        assert item["label"] == ("positive" if p["positive"] > p["negative"] else "negative")
        assert list(p.values()) == pytest.approx(reference_probabilities(model, tokenizer, text), abs=2e-6)


BAD_CLASSIFY = [
    ({"input": []}, "empty list"),
    ({"input": ["a text", "   \n"]}, "input[1]"),
    ({"input": ""}, "input: the text is empty"),
    ({"input": 5}, "a string or a list of strings"),
    ({"input": ["a", 5]}, "a string or a list of strings"),
    ({"input": {"text": "a"}}, "a string or a list of strings"),
    ({"input": None}, "a string or a list of strings"),
    ({"prompt": "a"}, "input: Field required"),
    ({"input": ["a"] * (MAX_CLASSIFY_TEXTS + 1)}, f"at most {MAX_CLASSIFY_TEXTS} texts"),
    ({"input": ["a", "x" * (MAX_CLASSIFY_CHARS + 1)]}, "input[1]:"),
]


@pytest.mark.parametrize("body,needle", BAD_CLASSIFY, ids=[n[:24] for _, n in BAD_CLASSIFY])
def test_bad_classify_input_gets_a_400_openai_error_naming_input(classify_server, body: dict, needle: str) -> None:
    client, _, runner = classify_server()
    error = assert_openai_error(client.post("/v1/classify", json=body), 400, "input")
    assert needle in error["message"], error
    assert runner.queue_depth == 0


def test_each_kind_of_model_refuses_the_other_kinds_endpoints_with_a_400_naming_the_right_one(
    classify_server, serve
) -> None:
    client, _, _ = classify_server()
    for path, body in [("/v1/completions", {"prompt": "x"}), ("/v1/chat/completions", {"input": ["x"]}),
                       ("/v1/completions", {"input": "x"})]:
        error = assert_openai_error(client.post(path, json=body), 400)
        assert error["code"] == "wrong_endpoint" and path in error["message"] and "/v1/classify" in error["message"]
    lm, engine = serve()
    error = assert_openai_error(lm.post("/v1/classify", json={"input": ["x"]}), 400)
    assert error["code"] == "wrong_endpoint" and "/v1/completions" in error["message"]
    assert assert_openai_error(lm.post("/v1/classify", json={"prompt": "x"}), 400)["code"] == "wrong_endpoint"
    assert engine.requests == []


def test_the_models_list_names_a_classifier_and_its_labels(classify_server) -> None:
    client, _, _ = classify_server()
    card = client.get("/v1/models").json()["data"][0]
    assert card["id"] == "sentiment" and card["task"] == "classification" and card["labels"] == list(LABELS)
    assert client.get("/v1/models/sentiment").json() == card
    assert_openai_error(client.post("/v1/classify", json={"model": "gpt-4", "input": "x"}), 404, "model")


def test_an_api_key_guards_classify(classify_server) -> None:
    client, _, _ = classify_server(api_key="s3cret")
    assert_openai_error(client.post("/v1/classify", json={"input": "x"}), 401)
    assert_openai_error(client.post("/v1/classify", json={"input": "x"}, headers={"Authorization": "Bearer no"}), 401)
    ok = client.post("/v1/classify", json={"input": "x"}, headers={"Authorization": "Bearer s3cret"})
    assert ok.status_code == 200, ok.text


def test_while_a_classifier_loads_health_and_classify_answer_503_then_200(classify_server) -> None:
    client, state, runner = classify_server(ready=False)
    assert client.get("/health").status_code == 503
    r = client.post("/v1/classify", json={"input": "x"})
    assert assert_openai_error(r, 503)["code"] == "model_loading" and r.headers["retry-after"]
    # The wrong endpoint is known before the model loads.
    assert assert_openai_error(client.post("/v1/completions", json={"prompt": "x"}), 400)["code"] == "wrong_endpoint"
    state.engine, state.status = runner, "ready"
    assert client.get("/health").status_code == 200
    assert client.post("/v1/classify", json={"input": "x"}).status_code == 200


def test_classify_metrics_count_requests_by_status_texts_tokens_and_forwards(classify_server) -> None:
    client, _, _ = classify_server()
    client.post("/v1/classify", json={"input": TEXTS[:3]})
    client.post("/v1/classify", json={"input": "token"})
    client.post("/v1/classify", json={"input": []})
    text = client.get("/metrics").text
    assert _sample(text, "llmctl_requests_total", endpoint="/v1/classify", status="200") == 2
    assert _sample(text, "llmctl_requests_total", endpoint="/v1/classify", status="400") == 1
    assert _sample(text, "llmctl_classified_texts_total") == 4
    assert _sample(text, "llmctl_classified_tokens_total") > 4
    assert _sample(text, "llmctl_classify_batch_size_count") == 2
    assert _sample(text, "llmctl_classify_batch_size_sum") == 4
    assert _sample(text, "llmctl_classify_duration_seconds_count") == 2
    assert _sample(text, "llmctl_model_ready") == 1 and _sample(text, "llmctl_queue_depth") == 0


def test_a_failing_forward_is_a_500_server_error_and_the_server_keeps_classifying(classify_server, classifier) -> None:
    class Flaky:
        task = "classification"
        calls = 0

        def __call__(self, ids, lengths):
            Flaky.calls += 1
            if Flaky.calls == 1:
                raise RuntimeError("boom")
            return classifier(ids, lengths)

    client, _, _ = classify_server(Flaky())
    error = assert_openai_error(client.post("/v1/classify", json={"input": "x"}), 500)
    assert error["type"] == "server_error" and "boom" in error["message"]
    assert client.post("/v1/classify", json={"input": "x"}).status_code == 200
    assert client.get("/health").status_code == 200


class GatedModel:
    """Wraps a classifier: each forward waits for `gate`; records the texts per forward and the threads used."""

    task = "classification"

    def __init__(self, model: Any):
        import threading

        self.model, self.gate, self.started = model, threading.Event(), threading.Event()
        self.forwards: list[int] = []
        self.threads: set[int] = set()
        self.active = self.most_active = 0

    def __call__(self, ids: Any, lengths: Any) -> Any:
        import threading

        self.active += 1
        self.most_active = max(self.most_active, self.active)
        self.threads.add(threading.get_ident())
        self.started.set()
        try:
            assert self.gate.wait(30)
            self.forwards.append(len(lengths))
            return self.model(ids, lengths)
        finally:
            self.active -= 1


def _encoded(tokenizer: Any, texts: list[str]) -> tuple[Any, Any]:
    return SPEC.encode(tokenizer, texts)


def test_the_runner_groups_waiting_requests_into_one_forward_on_one_thread(tokenizer: Any, classifier: Any) -> None:
    gated = GatedModel(classifier)
    runner = ClassifierRunner(gated, max_texts=4, max_queue=8)
    runner.start()
    try:
        first = runner.submit(*_encoded(tokenizer, TEXTS[:1]))
        assert gated.started.wait(30)  # the first forward runs (and waits) alone
        futures = [runner.submit(*_encoded(tokenizer, TEXTS[i : i + 1])) for i in range(1, 4)]
        bigger = runner.submit(*_encoded(tokenizer, TEXTS[4:6]))  # would make 5 texts: the next forward's
        dropped = runner.submit(*_encoded(tokenizer, TEXTS[:2]))
        assert dropped.cancel() and runner.queue_depth == 5 and runner.batch_size == 1
        gated.gate.set()
        results = [f.result(30) for f in [first, *futures, bigger]]
    finally:
        runner.stop()
    assert gated.forwards == [1, 3, 2]  # the cancelled request never ran
    assert len(gated.threads) == 1 and gated.most_active == 1
    for text, probs in zip(TEXTS, [r[0] for r in results[:4]] + [results[4][0], results[4][1]]):
        assert probs.tolist() == pytest.approx(reference_probabilities(classifier, tokenizer, text), abs=1e-6)


def test_the_runner_refuses_past_its_queue_and_after_stop_but_answers_what_waited(
    tokenizer: Any, classifier: Any
) -> None:
    gated = GatedModel(classifier)
    runner = ClassifierRunner(gated, max_texts=4, max_queue=1)
    runner.start()
    running = runner.submit(*_encoded(tokenizer, TEXTS[:1]))
    assert gated.started.wait(30)
    waiting = runner.submit(*_encoded(tokenizer, TEXTS[1:2]))
    with pytest.raises(ClassifierQueueFull):
        runner.submit(*_encoded(tokenizer, TEXTS[2:3]))
    gated.gate.set()
    runner.stop(drain=True)
    assert running.result(0).shape == (1, 3) and waiting.result(0).shape == (1, 3)
    with pytest.raises(RunnerStopped):
        runner.submit(*_encoded(tokenizer, TEXTS[:1]))


def test_a_full_classify_queue_answers_503_with_retry_after(classify_server, tokenizer: Any, classifier: Any) -> None:
    gated = GatedModel(classifier)
    client, _, runner = classify_server(gated, max_queue=1)
    try:
        runner.submit(*_encoded(tokenizer, TEXTS[:1]))
        assert gated.started.wait(30)
        runner.submit(*_encoded(tokenizer, TEXTS[1:2]))
        r = client.post("/v1/classify", json={"input": "x"})
        assert assert_openai_error(r, 503)["code"] == "queue_full" and int(r.headers["retry-after"]) >= 1
    finally:
        gated.gate.set()


def test_a_classifier_config_without_labels_or_max_len_is_refused_naming_the_file() -> None:
    assert ClassifierSpec.is_classifier({"num_classes": 2}) and not ClassifierSpec.is_classifier({"vocab_size": 9})
    good = {"num_classes": 2, "labels": ["neg", "pos"], "max_len": 32, "pad_id": 0}
    assert ClassifierSpec.from_config(good, "m/config.json") == ClassifierSpec(("neg", "pos"), 32, 0)
    for bad in ({**good, "labels": None}, {**good, "labels": ["a"]}, {**good, "labels": ["a", "a"]},
                {**good, "max_len": None}, {**good, "pad_id": "0"}):
        with pytest.raises(LlmctlError, match="m/config.json"):
            ClassifierSpec.from_config(bad, "m/config.json")
