"""The serving engine: batched output equals sequential `generate` (torch and ONNX Runtime), requests
joining mid-run, cancel, queue limits, stop ids, length, seeded sampling, logprobs, stop/drain, errors."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest
import torch

from llmctl.models.generation import SamplingParams, generate
from llmctl.serving.engine import Engine, GenerationRequest, RequestHandle, TokenEvent
from llmctl.serving.runner import QueueFull, Stopped as EngineStopped
from tests.conftest import TINY_MODEL, generated_text

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CONTEXT = TINY_MODEL["context_length"]
# A random model with init_std 0.5 picks varied tokens, and its top two logits stay more than 1e-3
# apart over these prompts: far above the ~1e-6 a batched matmul may differ from a single row's,
# so equal tokens test the batching, not luck. (With the default 0.02 every prompt repeats one token.)
INIT_STD = 0.5


def prompts(n: int, seed: int = 1) -> list[list[int]]:
    """n prompts of lengths 1..17 (ids 1..299: 0 stays free for a stop id)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 300, (1 + i % 17,), generator=g).tolist() for i in range(n)]


def greedy(model: Any, prompt: list[int], n: int, stop_ids: list[int] | None = None) -> list[int]:
    return generate(model, prompt, SamplingParams(max_new_tokens=n, temperature=0, stop_ids=stop_ids or []))


def collect(handle: RequestHandle, timeout: float = 30) -> tuple[list[int], list[TokenEvent]]:
    """All of a request's events, and the token ids among them."""
    events = list(handle.events_sync(timeout=timeout))
    return [e.token_id for e in events if e.token_id is not None], events


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    from llmctl.models.gpt import GPT, GPTConfig

    return GPT(GPTConfig(**{**TINY_MODEL, "init_std": INIT_STD})).eval()


@pytest.fixture
def make_engine():
    """Factory: a started Engine; every one is stopped after the test, and no engine thread may outlive it."""
    engines: list[Engine] = []

    def make(model: Any, start: bool = True, **kwargs: Any) -> Engine:
        engine = Engine(model, context_length=kwargs.pop("context_length", CONTEXT), **kwargs)
        engines.append(engine)
        if start:
            engine.start()
        return engine

    yield make
    for engine in engines:
        engine.stop(drain=False, timeout=10)
    assert not [t for t in threading.enumerate() if t.name == "llmctl-engine"]


def slow_steps(seconds: float):
    """An on_step callback that stretches each decode step, so a test can act while a request runs."""
    return lambda batch_size: time.sleep(seconds)


# --- batching does not change results --------------------------------------------------------------


def test_sixteen_concurrent_greedy_requests_equal_sequential_generate(model, make_engine):
    sizes: list[int] = []
    engine = make_engine(model, max_batch_size=16, on_step=sizes.append)
    todo = prompts(24)  # 24 > 16: the last 8 join the batch as the first ones finish
    budgets = [CONTEXT - len(p) - (i % 5) for i, p in enumerate(todo)]  # finishing at different steps
    handles = [engine.submit(GenerationRequest(p, n, temperature=0, stop_ids=[0])) for p, n in zip(todo, budgets)]
    got = [collect(h)[0] for h in handles]
    expected = [greedy(model, p, n, [0]) for p, n in zip(todo, budgets)]
    assert got == expected
    assert len({tuple(t) for t in expected}) == len(todo)  # distinct outputs: a mix-up of rows would show
    assert max(sizes) == 16 and engine.batch_size == 0 and engine.queue_depth == 0


def test_a_request_alone_in_the_engine_equals_generate(model, make_engine):
    engine = make_engine(model)
    for p in prompts(5, seed=3):
        assert collect(engine.submit(GenerationRequest(p, 10, temperature=0)))[0] == greedy(model, p, 10)


def test_an_empty_prompt_starts_from_the_first_stop_id_as_generate_does(model, make_engine):
    engine = make_engine(model)
    assert collect(engine.submit(GenerationRequest([], 6, temperature=0, stop_ids=[7])))[0] == greedy(model, [], 6, [7])


def test_a_request_joining_mid_run_does_not_wait_and_gets_the_same_tokens(model, make_engine):
    engine = make_engine(model, on_step=slow_steps(0.01))
    long_prompt, short_prompt = prompts(2, seed=5)
    long = engine.submit(GenerationRequest(long_prompt, CONTEXT - len(long_prompt), temperature=0))
    long_events = long.events_sync(timeout=30)
    first = [next(long_events) for _ in range(3)]  # the long request is decoding now
    short = engine.submit(GenerationRequest(short_prompt, 3, temperature=0))
    short_tokens, short_events = collect(short)
    assert not long.finished  # the short one joined, ran and left while the long one kept going
    assert short_tokens == greedy(model, short_prompt, 3) and short_events[-1].finish_reason == "length"
    long_tokens = [e.token_id for e in first + list(long_events) if e.token_id is not None]
    assert long_tokens == greedy(model, long_prompt, CONTEXT - len(long_prompt))


def test_seeded_sampling_gives_the_same_tokens_alone_and_batched(model, make_engine):
    engine = make_engine(model)
    p = prompts(3, seed=7)[2]
    sampled = dict(temperature=0.9, top_k=50, top_p=0.95, seed=123)
    alone = collect(engine.submit(GenerationRequest(p, 20, **sampled)))[0]
    others = [
        GenerationRequest(q, CONTEXT - len(q), temperature=0.8 if i % 2 else 0.0, seed=i)
        for i, q in enumerate(prompts(15, seed=8))
    ]
    handles = [engine.submit(r) for r in others[:7]]
    mine = engine.submit(GenerationRequest(p, 20, **sampled))
    handles += [engine.submit(r) for r in others[7:]]
    assert collect(mine)[0] == alone
    for h in handles:
        collect(h)
    reference = SamplingParams(max_new_tokens=20, temperature=0.9, top_k=50, top_p=0.95, seed=123)
    assert alone == generate(model, p, reference)
    assert collect(engine.submit(GenerationRequest(p, 20, **{**sampled, "seed": 124})))[0] != alone


@pytest.mark.parametrize("context_length", [None, CONTEXT], ids=["growing-cache", "preallocated-window"])
def test_the_batch_left_pads_joining_rows_and_cuts_columns_no_kept_row_uses(model, context_length):
    from llmctl.serving.batch import RunningBatch, prefill

    batch = RunningBatch(model, torch.device("cpu"), context_length=context_length)
    todo = [[1, 2, 3], list(range(10, 19)), [4, 5, 6, 7, 8]]
    with torch.inference_mode():
        caches = [prefill(model, p, torch.device("cpu"))[1] for p in todo]
        batch.join([(c, 42) for c in caches])
        assert (batch.width, batch.lengths) == (9, [3, 9, 5])
        k = batch.cache[1][0]  # (B, nkv, S, hs): each row's prompt keys are its rightmost columns
        assert torch.equal(k[0, :, 6:], caches[0][1][0][0]) and not k[0, :, :6].any()
        batch.step()
        assert (batch.width, batch.lengths) == (10, [4, 10, 6])
        batch.keep([0, 2])  # the longest row leaves: only the last 6 columns still hold a real key
        assert (batch.width, batch.lengths, batch.next_ids) == (6, [4, 6], [42, 42])
        assert torch.equal(batch.cache[1][0][1, :, :5], caches[2][1][0][0])


def test_the_preallocated_window_gives_the_growing_caches_logits_as_rows_come_and_go(model):
    """Joins, leaves and the window's moves (a small context: it reaches the buffer's end) change nothing."""
    from llmctl.serving.batch import RunningBatch, prefill

    cpu = torch.device("cpu")
    grown, windowed = RunningBatch(model, cpu), RunningBatch(model, cpu, max_rows=4, context_length=64)
    moves: list[int] = []
    move = windowed._move_window
    windowed._move_window = lambda new_end: (moves.append(new_end), move(new_end))  # type: ignore[method-assign]
    g = torch.Generator().manual_seed(4)
    # Rows take turns (none grows past 64 tokens) while the batch never empties: 150 steps slide the
    # window past the end of its 64 + 64 columns; then it empties and starts over.
    plan = [("join", 2), ("step", 25)] + [("join", 2), ("step", 25), ("keep", [2, 3])] * 5 + [
        ("keep", [1]), ("step", 3), ("keep", []), ("join", 3), ("step", 10)]
    with torch.inference_mode():
        for action, arg in plan:
            if action == "join":
                rows = []
                for _ in range(arg):
                    prompt = torch.randint(1, 300, (int(torch.randint(1, 12, (1,), generator=g)),), generator=g).tolist()
                    rows.append((prefill(model, prompt, cpu)[1], prompt[-1]))
                grown.join(rows)
                windowed.join(rows)
            elif action == "keep":
                grown.keep(arg)
                windowed.keep(arg)
            else:
                for _ in range(arg):
                    expected, got = grown.step(), windowed.step()
                    assert torch.allclose(got, expected, atol=1e-5, rtol=0)
                    next_ids = expected.argmax(-1).tolist()
                    grown.next_ids, windowed.next_ids = list(next_ids), list(next_ids)
            assert (windowed.width, windowed.lengths) == (grown.width, grown.lengths)
    assert windowed._window is not None and windowed._window.keys[0].shape[2] == 64 + 64
    assert moves  # the window reached the buffer's end and moved back


# --- ONNX Runtime ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def onnx_model(model, tmp_path_factory):
    """`model` exported to ONNX and opened in ONNX Runtime (about 5 s)."""
    from llmctl.data.tokenizer import train_tokenizer
    from llmctl.tasks.lm.export import export_onnx
    from llmctl.models.model_dir import load_model_dir, save_model_dir
    from llmctl.models.onnx_model import OnnxCausalLM

    root = tmp_path_factory.mktemp("serving-onnx")
    tokenizer = train_tokenizer(generated_text(50).splitlines(), vocab_size=300, min_frequency=1,
                                special_tokens=["<|endoftext|>"])
    tokenizer.save(str(root / "tokenizer.json"))
    save_model_dir(model, root / "model", tokenizer_path=root / "tokenizer.json", provenance={})
    report = export_onnx(load_model_dir(root / "model"), root / "export", quantize="int8")
    assert report.passed, report.failure
    return OnnxCausalLM(root / "export")


def test_onnx_backend_batched_greedy_equals_its_sequential_generate(onnx_model, make_engine):
    engine = make_engine(onnx_model, max_batch_size=16)
    todo = prompts(20, seed=11)
    budgets = [min(12, CONTEXT - len(p)) - i % 4 for i, p in enumerate(todo)]
    handles = [engine.submit(GenerationRequest(p, n, temperature=0, stop_ids=[0])) for p, n in zip(todo, budgets)]
    got = [collect(h)[0] for h in handles]
    expected = [greedy(onnx_model, p, n, [0]) for p, n in zip(todo, budgets)]
    assert got == expected
    assert len({tuple(t) for t in expected}) == len(todo)


def test_onnx_int8_graph_batched_greedy_equals_its_sequential_generate(onnx_model, make_engine):
    """An int8 graph quantizes activations per call: the engine decodes its rows one call each."""
    from llmctl.models.onnx_model import OnnxCausalLM

    int8 = OnnxCausalLM(onnx_model.graph_path.parent, file="model.int8.onnx")
    assert not int8.batch_invariant and onnx_model.batch_invariant
    engine = make_engine(int8, max_batch_size=16)
    todo = prompts(16, seed=12)
    budgets = [min(10, CONTEXT - len(p)) - i % 3 for i, p in enumerate(todo)]
    handles = [engine.submit(GenerationRequest(p, n, temperature=0, stop_ids=[0])) for p, n in zip(todo, budgets)]
    assert [collect(h)[0] for h in handles] == [greedy(int8, p, n, [0]) for p, n in zip(todo, budgets)]


def test_torch_int8_model_batched_greedy_equals_its_sequential_generate(model, make_engine):
    import copy

    from llmctl.compression.quantization import quantize_model

    int8 = quantize_model(copy.deepcopy(model), "int8")
    assert int8.batch_invariant is False
    sizes: list[int] = []
    engine = make_engine(int8, max_batch_size=16, on_step=sizes.append)
    todo = prompts(16, seed=13)
    budgets = [min(12, CONTEXT - len(p)) - i % 4 for i, p in enumerate(todo)]
    handles = [engine.submit(GenerationRequest(p, n, temperature=0, stop_ids=[0])) for p, n in zip(todo, budgets)]
    assert [collect(h)[0] for h in handles] == [greedy(int8, p, n, [0]) for p, n in zip(todo, budgets)]
    assert max(sizes) > 1  # the rows were scheduled together, each decoded in a call of its own


# --- finishing: stop ids, length, logprobs ----------------------------------------------------------


def test_a_stop_id_ends_the_request_without_emitting_the_stop_token(model, make_engine):
    engine = make_engine(model)
    p = prompts(4, seed=9)[3]
    free_run = greedy(model, p, 12)
    stop = next(t for i, t in enumerate(free_run) if i >= 3 and t not in free_run[:i])
    tokens, events = collect(engine.submit(GenerationRequest(p, 12, temperature=0, stop_ids=[stop])))
    assert tokens == free_run[: free_run.index(stop)] == greedy(model, p, 12, [stop])
    assert events[-1] == TokenEvent(None, None, None, "stop")
    assert all(e.finish_reason is None for e in events[:-1])


def test_length_ends_on_the_last_token_event(model, make_engine):
    engine = make_engine(model)
    tokens, events = collect(engine.submit(GenerationRequest([5, 6, 7], 6, temperature=0)))
    assert len(tokens) == len(events) == 6
    assert events[-1].token_id is not None and events[-1].finish_reason == "length"
    zero = collect(engine.submit(GenerationRequest([5, 6, 7], 0)))[1]
    assert zero == [TokenEvent(None, None, None, "length")]


def test_logprobs_are_the_models_log_softmax_with_the_top_k(model, make_engine):
    engine = make_engine(model)
    p = prompts(6, seed=4)[5]
    with_top = engine.submit(GenerationRequest(p, 8, temperature=0.7, seed=3, logprobs=3))
    chosen_only = engine.submit(GenerationRequest(p, 8, temperature=0, logprobs=0))
    without = engine.submit(GenerationRequest(p, 8, temperature=0))
    tokens, events = collect(with_top)
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([p + tokens]))[0, len(p) - 1 : -1], dim=-1)  # (8, V)
    for i, (token, event) in enumerate(zip(tokens, events)):
        assert event.logprob == pytest.approx(lp[i, token].item(), abs=1e-4)
        assert len(event.top_logprobs) == 3
        assert list(event.top_logprobs.values()) == pytest.approx(lp[i].topk(3).values.tolist(), abs=1e-4)
        assert [lp[i, t].item() for t in event.top_logprobs] == pytest.approx(
            list(event.top_logprobs.values()), abs=1e-4)
    greedy_tokens, greedy_events = collect(chosen_only)
    for event in greedy_events:  # greedy picks the top token, so its logprob is the row's maximum
        assert event.top_logprobs is None and event.logprob <= 0
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([p + greedy_tokens]))[0, len(p) - 1 : -1], dim=-1)
    assert [e.logprob for e in greedy_events] == pytest.approx(lp.max(-1).values.tolist(), abs=1e-4)
    assert all(e.logprob is None and e.top_logprobs is None for e in collect(without)[1])


# --- cancel, queue, stop ----------------------------------------------------------------------------


def test_cancel_mid_run_frees_the_slot_for_the_waiting_request(model, make_engine):
    engine = make_engine(model, max_batch_size=1, on_step=slow_steps(0.005))
    first, second = prompts(2, seed=12)
    running = engine.submit(GenerationRequest(first, CONTEXT - len(first), temperature=0))
    waiting = engine.submit(GenerationRequest(second, 4, temperature=0))
    events = running.events_sync(timeout=30)
    next(events), next(events)  # the second token comes from a decode step: the request holds the slot
    assert engine.batch_size == 1 and engine.queue_depth == 1
    running.cancel()
    rest = list(events)
    assert rest[-1] == TokenEvent(None, None, None, "cancelled")
    assert len(rest) < CONTEXT - len(first)
    assert collect(waiting)[0] == greedy(model, second, 4)
    running.cancel()  # once finished, a no-op


def test_cancelling_a_waiting_request_ends_it_at_once(model, make_engine):
    engine = make_engine(model, start=False)
    handle = engine.submit(GenerationRequest([1, 2], 4))
    assert engine.queue_depth == 1
    handle.cancel()
    assert engine.queue_depth == 0 and handle.finished
    assert collect(handle, timeout=1)[1] == [TokenEvent(None, None, None, "cancelled")]


def test_submit_raises_queue_full_when_max_queue_requests_wait(model, make_engine):
    engine = make_engine(model, start=False, max_queue=2)
    waiting = [engine.submit(GenerationRequest([1, 2], 4)) for _ in range(2)]
    with pytest.raises(QueueFull):
        engine.submit(GenerationRequest([1, 2], 4))
    assert engine.queue_depth == 2
    engine.start()
    assert all(collect(h)[1][-1].finish_reason == "length" for h in waiting)
    engine.submit(GenerationRequest([1, 2], 4))  # room again


def test_stop_with_drain_finishes_running_and_waiting_requests(model, make_engine):
    engine = make_engine(model, max_batch_size=2, on_step=slow_steps(0.005))
    todo = prompts(4, seed=13)
    handles = [engine.submit(GenerationRequest(p, 10, temperature=0)) for p in todo]
    events = handles[0].events_sync(timeout=30)
    first = next(events)
    engine.stop(drain=True)
    assert not engine.running
    assert [first.token_id] + [e.token_id for e in events] == greedy(model, todo[0], 10)
    for h, p in zip(handles[1:], todo[1:]):
        assert collect(h, timeout=1)[0] == greedy(model, p, 10)
    with pytest.raises(EngineStopped):
        engine.submit(GenerationRequest([1], 2))


def test_stop_without_drain_cancels_what_is_left(model, make_engine):
    engine = make_engine(model, max_batch_size=1, on_step=slow_steps(0.005))
    running = engine.submit(GenerationRequest([3, 4], 20, temperature=0))
    waiting = engine.submit(GenerationRequest([5, 6], 20, temperature=0))
    events = running.events_sync(timeout=30)
    next(events)
    engine.stop(drain=False)
    assert not engine.running
    assert list(events)[-1].finish_reason == "cancelled"
    assert collect(waiting, timeout=1)[1] == [TokenEvent(None, None, None, "cancelled")]


def test_a_drain_that_runs_past_its_timeout_cancels_the_rest(model, make_engine):
    engine = make_engine(model, on_step=slow_steps(0.01))
    handle = engine.submit(GenerationRequest([3, 4], 25, temperature=0))
    events = handle.events_sync(timeout=30)
    next(events)
    engine.stop(drain=True, timeout=0.05)  # the request needs ~0.25 s more
    assert not engine.running
    assert list(events)[-1].finish_reason == "cancelled"


def test_requests_that_do_not_fit_are_refused_before_queueing(model, make_engine):
    engine = make_engine(model, start=False)
    with pytest.raises(ValueError, match="context length of 32"):
        engine.submit(GenerationRequest([1] * 20, 13))
    engine.submit(GenerationRequest([1] * 20, 12))  # exactly fits
    for bad, field in [
        (GenerationRequest([300], 2), "prompt_ids"),
        (GenerationRequest([1], 2, temperature=-1), "temperature"),
        (GenerationRequest([1], 2, top_p=0), "top_p"),
        (GenerationRequest([1], 2, top_k=0), "top_k"),
        (GenerationRequest([1], -1), "max_new_tokens"),
    ]:
        with pytest.raises(ValueError, match=field):
            engine.submit(bad)
    assert engine.queue_depth == 1


# --- asyncio readers ---------------------------------------------------------------------------------


def test_async_readers_on_their_own_event_loop_get_every_event(model, make_engine):
    engine = make_engine(model)
    todo = prompts(4, seed=14)

    async def read(handle: RequestHandle) -> list[int]:
        return [e.token_id async for e in handle.events() if e.token_id is not None]

    async def main() -> list[list[int]]:
        handles = [engine.submit(GenerationRequest(p, 6, temperature=0)) for p in todo]
        return await asyncio.gather(*(read(h) for h in handles))

    assert asyncio.run(main()) == [greedy(model, p, 6) for p in todo]


def test_an_async_reader_that_goes_away_cancels_its_request(model, make_engine):
    engine = make_engine(model, on_step=slow_steps(0.005))

    async def main() -> RequestHandle:
        handle = engine.submit(GenerationRequest([7, 8], 25, temperature=0))
        events = handle.events()
        await events.__anext__()
        await events.aclose()  # what Starlette does to a stream whose client disconnected
        return handle

    handle = asyncio.run(main())
    deadline = time.monotonic() + 10
    while not (handle.finished and engine.batch_size == 0) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert handle.finished and engine.batch_size == 0


# --- errors ------------------------------------------------------------------------------------------


class FailingModel:
    """`model`, except that prompts holding `bad_token` fail, and so does the next batched decode step when armed."""

    def __init__(self, model: Any, bad_token: int):
        self.model, self.bad_token = model, bad_token
        self.config, self.context_length, self.device = model.config, model.context_length, torch.device("cpu")
        self.fail_next_batched_step = False

    def eval(self) -> "FailingModel":
        return self

    def __call__(self, input_ids: torch.Tensor, past_key_values=None, **kwargs):
        if past_key_values is None and self.bad_token in input_ids[0].tolist():
            raise RuntimeError("this prompt breaks the backend")
        if past_key_values is not None and input_ids.shape[0] > 1 and self.fail_next_batched_step:
            self.fail_next_batched_step = False
            raise RuntimeError("the batched step broke")
        return self.model(input_ids, past_key_values=past_key_values, **kwargs)


def test_a_failing_prefill_fails_only_its_request(model, make_engine):
    engine = make_engine(FailingModel(model, bad_token=299))
    good, bad = [4, 5, 6], [4, 299]
    handles = [engine.submit(GenerationRequest(p, 5, temperature=0)) for p in (good, bad, good)]
    assert collect(handles[0])[0] == collect(handles[2])[0] == greedy(model, good, 5)
    final = collect(handles[1])[1][-1]
    assert final.finish_reason == "error" and "this prompt breaks the backend" in final.message


def test_a_failing_decode_step_fails_its_batch_and_the_engine_keeps_serving(model, make_engine):
    failing = FailingModel(model, bad_token=299)
    calls: list[int] = []

    def on_step(batch_size: int) -> None:
        calls.append(batch_size)
        raise RuntimeError("a broken metrics callback")  # logged, never fatal

    engine = make_engine(failing, start=False, on_step=on_step)
    failing.fail_next_batched_step = True
    handles = [engine.submit(GenerationRequest(p, 5, temperature=0)) for p in ([1, 2], [3, 4, 5])]
    engine.start()
    for h in handles:
        final = collect(h)[1][-1]
        assert final.finish_reason == "error" and "the batched step broke" in final.message
    assert engine.running and engine.batch_size == 0
    assert collect(engine.submit(GenerationRequest([9, 10], 5, temperature=0)))[0] == greedy(model, [9, 10], 5)
    assert calls  # the callback ran, and raised, on every step after the failure


@pytest.mark.parametrize("graph,file", [(None, "model.onnx"), ("int8", "model.int8.onnx")])
def test_serve_loads_the_graph_asked_for_with_onnx_runtime_threads_that_never_spin(onnx_model, graph, file):
    """ONNX Runtime's threads busy-wait after each run by default; in the server they took the cores the
    HTTP thread needed, and 16 clients got 0.4-0.6x the tokens/s of one (issue 16)."""
    from llmctl.serving.model_info import inspect_model, load_served_model

    served = load_served_model(inspect_model(onnx_model.graph_path.parent, "fp32", graph))
    options = served.session.get_session_options()
    assert served.graph_path.name == file
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert options.get_session_config_entry("session.inter_op.allow_spinning") == "0"
    assert served.batch_invariant == (graph is None)
