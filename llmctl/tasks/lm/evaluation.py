"""A language model in `llmctl eval`: loss, perplexity and bits per byte on its val split (or another
dataset dir, or text files), sample continuations, the `--max-ppl` gate; `--compare` profiles several
models (each graph of an export dir) on the first one's tokens: perplexity, size, latency, tokens/s."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from llmctl.errors import LlmctlError
from llmctl.evaluation.gates import judge
from llmctl.evaluation.request import EvalOutcome, EvalRequest, Sampling
from llmctl.evaluation.targets import warn_if_unverified
from llmctl.progress import Progress, silent_if_none

COMPARE_MAX_TOKENS = 65536  # tokens a compare scores unless --max-tokens says otherwise
VIEW, COMPARE_VIEW = "lm", "lm-compare"  # the tables `llmctl eval` prints these reports in


def refuse_options(request: EvalRequest) -> None:
    """Refuse what a language model's eval does not take: the classifier's options, --data with --text."""
    given = request.given({"--predict": request.predict, "--predictions": request.predictions, "--out": request.out,
                           "--min-f1": request.min_f1, "--min-accuracy": request.min_accuracy})
    if given:
        raise LlmctlError(f"{', '.join(given)}: for classifiers; {request.paths[0]} is a language model.")
    if request.data and request.text:
        raise LlmctlError("--data and --text contradict each other; choose one.")


def evaluate(request: EvalRequest, progress: Progress | None = None) -> EvalOutcome:
    """Score one model dir, export dir or HF dir; sample its continuations of `request.prompts`."""
    from llmctl.data.tokenizer import token_byte_lengths
    from llmctl.evaluation.perplexity import evaluate_tokens
    from llmctl.evaluation.profile import backend_name
    from llmctl.models.loading import load_for_inference

    progress = silent_if_none(progress)
    path, max_tokens = request.paths[0], request.max_tokens
    loaded = load_for_inference(path)
    warn_if_unverified(path, progress)
    tokens, source, unigram = eval_tokens(loaded, request.data, request.text, request.split)
    scored = min(len(tokens), max_tokens + 1 if max_tokens is not None else len(tokens)) - 1
    progress.stage(f"perplexity on {scored:,} tokens of {source}", unit="tokens")
    result = evaluate_tokens(loaded.model, tokens, token_byte_lengths(loaded.tokenizer), source=source,
                             batch_size=request.batch_size, max_tokens=max_tokens, on_progress=progress.update)
    result.unigram_perplexity = unigram if max_tokens is None else None
    report = {**result.to_dict(), "model_dir": str(path), "backend": backend_name(loaded),
              "step": loaded.provenance.get("step")}
    report["samples"] = _samples(loaded, request.prompts, request.sampling)
    if report["samples"]:
        report["decoding"] = _decoding(request.sampling)
    judge(report, {"max_ppl": request.max_ppl}, {"max_ppl": report["perplexity"]})
    return EvalOutcome(report, VIEW)


def compare(request: EvalRequest, progress: Progress | None = None) -> EvalOutcome:
    """Profile each dir (each ONNX graph of an export dir) on the first one's tokens, in this process;
    `--max-ppl` bounds the worst perplexity."""
    from llmctl.data.tokenizer import token_byte_lengths
    from llmctl.evaluation.profile import profile_models

    progress = silent_if_none(progress)
    loaded = _load_compared(request.paths, progress)
    tokens, source, _ = eval_tokens(loaded[0][1], request.data, request.text, request.split)
    tokens = tokens[: (request.max_tokens or COMPARE_MAX_TOKENS) + 1]
    progress.note(f"profiling {len(loaded)} models on {len(tokens) - 1:,} tokens; timings interleaved")
    profiles = profile_models([m for _, m in loaded], tokens, token_byte_lengths(loaded[0][1].tokenizer),
                              [name for name, _ in loaded], progress=progress)
    rows = [p.to_dict() for p in profiles]
    base = rows[0]["perplexity"]
    for r in rows:
        r["perplexity_change_pct"] = 100 * (r["perplexity"] / base - 1) if base and r["perplexity"] else None
    report = {"source": source, "tokens": int(len(tokens) - 1), "rows": rows}
    worst = max((r["perplexity"] for r in rows if r["perplexity"] is not None), default=None)
    judge(report, {"max_ppl": request.max_ppl}, {"max_ppl": worst})
    return EvalOutcome(report, COMPARE_VIEW)


def _load_compared(paths: list[Path], progress: Progress) -> list[tuple[str, Any]]:
    """(name, loaded model) of each dir, both graphs of an export dir; refuses models whose tokenizers differ."""
    from llmctl.artifacts import ExportDir
    from llmctl.models.loading import backend_of, load_for_inference

    targets: list[tuple[Path, str | None]] = []
    for path in paths:
        if backend_of(path) == "onnxruntime":
            warn_if_unverified(path, progress)
            targets.append((path, "model.onnx"))
            if ExportDir(path).onnx_int8.is_file():
                targets.append((path, "model.int8.onnx"))
        else:
            targets.append((path, None))
    loaded: list[tuple[str, Any]] = []
    for path, graph in targets:
        model = load_for_inference(path, onnx_file=graph, spin_threads=False)  # timings side by side
        if loaded and model.tokenizer.get_vocab() != loaded[0][1].tokenizer.get_vocab():
            raise LlmctlError(f"{path}: its tokenizer differs from {paths[0]}'s; --compare needs models that share one.")
        loaded.append((str(path), model))
    return loaded


def eval_tokens(loaded: Any, data: Path | None, text: list[Path], split: str) -> tuple[np.ndarray, str, float | None]:
    """(tokens, source, unigram perplexity or None) that a model is scored on: `text` files encoded with its
    tokenizer, else a split of `data` or of the dataset dir it was trained on."""
    from llmctl.artifacts import DatasetDir
    from llmctl.data.shards import TokenShards
    from llmctl.data.tokenizer import eot_id
    from llmctl.evaluation.perplexity import check_same_tokenizer, dataset_of_model, encode_text_files

    for f in text:
        if not f.is_file():
            raise LlmctlError(f"--text {f}: no such file.")
    if text:
        return encode_text_files(text, loaded.tokenizer, eot_id(loaded.tokenizer)), ", ".join(str(f) for f in text), None
    dataset = DatasetDir(data) if data else dataset_of_model(loaded.provenance, loaded.path)
    check_same_tokenizer(dataset, Path(loaded.path) / "tokenizer.json")
    shards = TokenShards(dataset.path)
    unigram = (shards.meta.get("unigram") or {}).get("perplexity") if split == "val" else None
    return shards.split(split), f"{dataset.path} ({split})", unigram


def _samples(loaded: Any, prompts: list[str], sampling: Sampling) -> list[dict[str, Any]]:
    """The model's continuation of each prompt, decoded as `sampling` says (prompt i seeded seed + i)."""
    from llmctl.data.tokenizer import eot_id
    from llmctl.models.generation import SamplingParams, generate

    if not prompts:
        return []
    out = []
    eot = eot_id(loaded.tokenizer)
    s = sampling
    for i, text in enumerate(prompts):
        ids = loaded.tokenizer.encode(text, add_special_tokens=False).ids
        params = SamplingParams(s.max_new_tokens, s.temperature, s.top_k, s.top_p, stop_ids=[eot], seed=s.seed + i)
        new = generate(loaded.model, ids, params)
        out.append({"prompt": text, "completion": loaded.tokenizer.decode(new, skip_special_tokens=False), "tokens": len(new)})
    return out


def _decoding(sampling: Sampling) -> dict[str, Any]:
    """How the samples were decoded, for the report and the line above them."""
    if sampling.temperature <= 0:
        return {"mode": "greedy", "temperature": 0.0}
    return {"mode": "sampled", "temperature": sampling.temperature, "top_k": sampling.top_k, "top_p": sampling.top_p,
            "seed": sampling.seed}
