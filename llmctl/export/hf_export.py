"""`llmctl export --format hf`'s engine: a `gpt` model dir -> a Hugging Face model dir.

The `gpt` family is Llama under HF's parameter names, so the weights are copied as they are into
model.safetensors (fp32; a quantized model dir's integer weights dequantized, rounding kept) beside
a LlamaConfig config.json (Qwen2Config for a model with attention biases and Qwen2's tokenizer; with
biases and another tokenizer, Llama's attention_bias and zero o_proj biases), the tokenizer as
tokenizer.json + tokenizer_config.json, and generation_config.json. Before the directory is moved
into place, transformers loads it and runs beside llmctl: logits on real val tokens (a full window,
then greedy decode steps through each one's KV cache) must agree within atol, and AutoTokenizer must
encode sample texts to the ids the `tokenizers` file gives. The figures go to export.json.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from llmctl.artifacts import HFModelDir, staged_dir, usual_mode, write_atomic, write_json_atomic
from llmctl.compression.quantization import dequantize
from llmctl.errors import LlmctlError
from llmctl.export.report import ExportReport
from llmctl.export.source import float_model
from llmctl.export.verify import ParityRow
from llmctl.progress import Progress, silent_if_none
from llmctl.models.hf import (
    O_PROJ_BIAS,
    hf_architecture,
    hf_config_from_gpt,
    hf_tokenizer_config,
    leading_special_token,
)

DECODE_STEPS = 4  # greedy steps through the KV cache after the prefix
WINDOW = 256  # tokens per verification row at most (the model's context when shorter)
FIXED_TEXTS = (
    "Hello, world!",
    "def add(x, y):\n    return x + y\n",
    "  two leading spaces and a trailing one ",
    "naïve café, Ünïcödé, 日本語, emoji 🤖",
    "",
)


def export_hf(
    loaded: Any,
    out_dir: Path,
    *,
    atol: float = 1e-4,
    eval_tokens: np.ndarray | None = None,
    progress: Progress | None = None,
) -> ExportReport:
    """Write a loaded `gpt` model dir to `out_dir` as a Hugging Face model dir, verified with transformers.

    `eval_tokens` (token ids, the model's val split) feed the logits comparison; without them seeded
    random ids do. An existing export dir at `out_dir` is replaced; any other non-empty directory is
    refused. A parity or tokenizer failure does not raise: the directory is written and the report
    (and export.json) say passed False, for the caller to exit 3 on. Bad input raises LlmctlError
    (exit 2) before any work; nothing is left under `out_dir` on an error.
    """
    from llmctl.tasks import task_of_config

    out_dir = Path(out_dir)
    _check_request(loaded, out_dir, atol, eval_tokens)
    progress = silent_if_none(progress)
    model, source_quantization = float_model(loaded, dequantize)
    config = model.config.to_dict()
    seconds: dict[str, float] = {}

    with staged_dir(out_dir, f"the export dir {out_dir}") as tmp:
        layout = HFModelDir(tmp)
        start = time.perf_counter()
        bos, eos = _special_tokens(loaded)
        token_id = loaded.tokenizer.token_to_id
        model_type = hf_architecture(config, loaded.tokenizer)
        hf_config = hf_config_from_gpt(config, model_type, bos_id=token_id(bos) if bos else None,
                                       eos_id=token_id(eos) if eos else None)
        progress.stage(f"writing {hf_config['architectures'][0]}: config.json, model.safetensors, tokenizer files")
        weight_bytes = _write_weights(model, layout.weights, zero_o_proj_bias=model_type == "llama" and config["attention_bias"])
        write_atomic(layout.config, json.dumps(hf_config, indent=2) + "\n")
        write_atomic(layout.generation_config, json.dumps(
            {"bos_token_id": hf_config["bos_token_id"], "eos_token_id": hf_config["eos_token_id"]}, indent=2) + "\n")
        loaded.tokenizer.save(str(layout.tokenizer))
        tokenizer_config = hf_tokenizer_config(
            bos=bos, eos=eos, chat_template=loaded.config.get("chat_template"), context_length=config["context_length"]
        )
        write_atomic(layout.tokenizer_config, json.dumps(tokenizer_config, indent=2, ensure_ascii=False) + "\n")
        seconds["write"] = time.perf_counter() - start

        progress.stage("verifying with transformers (AutoModelForCausalLM logits and greedy decode, AutoTokenizer ids)")
        start = time.perf_counter()
        verification = verify_hf_dir(tmp, model, loaded.tokenizer, atol=atol, tokens=eval_tokens)
        seconds["verify"] = time.perf_counter() - start
        reference = "llmctl fp32" + (", dequantized from the model dir's integer weights" if source_quantization else "")
        manifest = {
            "format": "hf",
            "task": task_of_config(loaded.config).name,
            "architecture": hf_config["architectures"][0],
            "source": {"model_dir": str(Path(loaded.path).resolve())},
            "source_quantization": source_quantization,
            "parameters": sum(p.numel() for p in model.parameters()),
            "weight_bytes": weight_bytes,
            "files": {"config": layout.config.name, "weights": layout.weights.name, "tokenizer": layout.tokenizer.name,
                      "tokenizer_config": layout.tokenizer_config.name, "generation_config": layout.generation_config.name},
            "special_tokens": {"bos": bos, "eos": eos},
            "chat_template": "chat_template" in tokenizer_config,
            "verification": {"reference": reference, **verification},
            "seconds": seconds,
        }
        write_json_atomic(layout.manifest, manifest)

    figures = {k: manifest[k] for k in ("architecture", "parameters", "weight_bytes", "seconds")}
    figures["verification"] = {k: v for k, v in manifest["verification"].items() if k not in ("passed", "failure", "rows")}
    paths = {"dir": str(out_dir), **{k: str(out_dir / name) for k, name in manifest["files"].items()},
             "export_json": str(HFModelDir(out_dir).manifest)}
    v, g, t = figures["verification"], verification["greedy"], verification["tokenizer"]
    summary = [
        f"inputs: {v['inputs']}, {v['window'][0]} x {v['window'][1]} tokens; greedy picks "
        f"{'identical' if g['identical'] else 'DIFFER'} over {g['compared']} steps; AutoTokenizer ids "
        f"{'identical' if t['identical'] else 'DIFFER'} on {t['texts']} texts",
        f"wrote {out_dir} ({manifest['architecture']}: {', '.join(Path(p).name for k, p in paths.items() if k != 'dir')})",
    ]
    return ExportReport(verification["passed"], verification["failure"], verification["rows"], figures, paths,
                        title=f"transformers {v['transformers_version']} vs llmctl", check="verification",
                        summary=summary)


def _check_request(loaded: Any, out_dir: Path, atol: float, eval_tokens: Any) -> None:
    """Refuse what cannot be exported, before any work, naming what to change."""
    from llmctl.models.gpt import GPT

    if not isinstance(loaded.model, GPT):
        raise LlmctlError(
            f"--format hf: {loaded.path} is not a `gpt` language model; the Hugging Face export writes causal "
            "language models (LlamaForCausalLM) only. Export it with --format onnx."
        )
    family = loaded.config.get("family", "gpt")
    if family != "gpt":
        raise LlmctlError(f"--format hf: {loaded.path} is family {family!r}; only family gpt maps to a Hugging Face model.")
    if loaded.config.get("quantization") and loaded.config.get("attention_bias"):
        raise LlmctlError(
            f"--format hf: {loaded.path} is quantized and has attention biases, which its quantized layers do not "
            "keep; export the float model dir it was compressed from."
        )
    if not atol >= 0:
        raise LlmctlError(f"--atol {atol}: the tolerance must be 0 or more.")
    vocab = loaded.config.get("vocab_size")
    if eval_tokens is not None and len(eval_tokens) and int(np.max(eval_tokens)) >= vocab:
        raise LlmctlError(f"eval tokens: ids up to {int(np.max(eval_tokens))}, but the model's vocab_size is {vocab}; "
                          "were they made by another tokenizer?")
    if out_dir.is_file():
        raise LlmctlError(f"{out_dir}: is a file; the export writes a directory there.")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not HFModelDir(out_dir).manifest.is_file():
        raise LlmctlError(
            f"{out_dir}: exists and is not an export dir (no export.json); choose a new directory, "
            "as the export replaces the whole directory."
        )


def _write_weights(model: Any, path: Path, *, zero_o_proj_bias: bool) -> int:
    """model.safetensors with HF's names (the `gpt` family's own); a tied head stored once. Returns bytes.

    `zero_o_proj_bias`: add the zero o_proj biases a Llama config with attention_bias expects."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        tensors.pop("lm_head.weight", None)
    if zero_o_proj_bias:
        for i in range(model.config.n_layer):
            tensors[f"model.layers.{i}{O_PROJ_BIAS}"] = torch.zeros(model.config.d_model)
    save_file(tensors, str(path), metadata={"format": "pt"})
    usual_mode(path)  # safetensors writes through a private (0600) temporary
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _special_tokens(loaded: Any) -> tuple[str | None, str | None]:
    """(bos, eos): the token the tokenizer puts before every text, if any, and the dataset's end-of-text token."""
    tokenizer = loaded.tokenizer
    recorded = ((loaded.provenance.get("recipe") or {}).get("data") or {}).get("special_tokens") or []
    eos = next((t for t in recorded[:1] if tokenizer.token_to_id(t) is not None), None)
    if eos is None and tokenizer.token_to_id("<|endoftext|>") is not None:
        eos = "<|endoftext|>"
    return leading_special_token(tokenizer), eos


# --- verification ------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers' info messages and progress bars off while it loads the export."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def verify_hf_dir(path: Path, model: Any, tokenizer: Any, *, atol: float, tokens: np.ndarray | None) -> dict[str, Any]:
    """Load `path` with transformers and compare it with `model` (llmctl's) and `tokenizer` (`tokenizers`).

    Logits of up to two windows of WINDOW tokens (from `tokens` when they are long enough, else seeded
    random ids) and of DECODE_STEPS greedy steps through each side's KV cache must agree within
    `atol`, and so must every greedy pick; AutoTokenizer must encode the sample texts (decoded val
    windows and FIXED_TEXTS) to the same ids. Returns passed, failure, rows and the figures.
    """
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _quiet_transformers():
        try:
            hf_model = AutoModelForCausalLM.from_pretrained(str(path)).to(torch.float32).eval()  # config.json says float32
            hf_tokenizer = AutoTokenizer.from_pretrained(str(path))
        except Exception as e:  # transformers raises many types; all mean "it does not load"
            raise LlmctlError(
                f"transformers {transformers.__version__} cannot load the export: {type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}", kind="export_failed", exit_code=1,
            ) from e
    ids, inputs = _windows(model.config, tokens)

    with torch.no_grad():
        ref = model(ids)  # (B, T, V)
        got = hf_model(input_ids=ids).logits
    logits = _row("logits", f"{ids.shape[0]} x {ids.shape[1]} tokens", got, ref, atol)

    cached = hf_cache_feed(hf_model)
    prefix = ids[:1, : max(1, min(8, ids.shape[1] - DECODE_STEPS))]  # (1, P)
    decode = ParityRow("decode logits", 0.0, 0.0, "", True)
    picks: list[int] = []
    first_difference = None
    with torch.no_grad():
        ref, past_ref = model(prefix, use_cache=True)
        out = hf_model(input_ids=prefix, use_cache=True)
        for step in range(DECODE_STEPS + 1):
            where = "prefix" if step == 0 else f"decode step {step}"
            _fold(decode, _row("decode logits", where, out.logits, ref, atol))
            pick, pick_hf = int(ref[0, -1].argmax()), int(out.logits[0, -1].argmax())
            if pick != pick_hf and first_difference is None:
                first_difference = f"{where}: llmctl picks token {pick}, transformers {pick_hf}"
            picks.append(pick)
            if step == DECODE_STEPS or prefix.shape[1] + step + 1 > model.config.context_length:
                break
            nxt = torch.tensor([[pick]])
            ref, past_ref = model(nxt, past_ref, use_cache=True)
            out = hf_model(input_ids=nxt, use_cache=True, **cached(out))

    texts = [*_sample_texts(tokenizer, tokens), *FIXED_TEXTS]
    tokenizer_check = {"texts": len(texts), "identical": True, "first_difference": None}
    for text in texts:
        with _quiet_transformers():  # it warns of texts longer than the model's context
            have = hf_tokenizer(text)["input_ids"]
        want = tokenizer.encode(text).ids
        if want != have:
            i = next((i for i, (a, b) in enumerate(zip(want, have)) if a != b), min(len(want), len(have)))
            tokenizer_check["identical"] = False
            tokenizer_check["first_difference"] = (
                f"{text[:40]!r}, from id {i}: tokenizers gives {want[i : i + 4]}, AutoTokenizer {have[i : i + 4]}")
            break

    rows = [logits, decode]
    failure = None
    broken = next((r for r in rows if not r.passed), None)
    if broken is not None:
        failure = (f"transformers and llmctl disagree: {broken.output} differ by up to {broken.max_abs:.3g} "
                   f"({broken.worst}; atol {atol:g}).")
    elif first_difference:
        failure = f"greedy decoding differs: {first_difference}."
    elif not tokenizer_check["identical"]:
        failure = f"AutoTokenizer encodes differently from tokenizer.json: {tokenizer_check['first_difference']}."
    return {
        "passed": failure is None,
        "failure": failure,
        "rows": [r.to_dict() for r in rows],
        "atol": atol,
        "inputs": inputs,
        "window": list(ids.shape),
        "logits_max_abs_diff": logits.max_abs,
        "decode_max_abs_diff": decode.max_abs,
        "greedy": {"compared": len(picks), "identical": first_difference is None, "first_difference": first_difference},
        "tokenizer": tokenizer_check,
        "transformers_version": transformers.__version__,
    }


def hf_cache_feed(hf_model: Any) -> Callable[[Any], dict[str, Any]]:
    """`feed(output)`: the keyword that hands a transformers output's KV cache to the next forward call
    (`cache` from transformers 5.24 on, `past_key_values` before)."""
    import inspect

    name = "cache" if "cache" in inspect.signature(hf_model.forward).parameters else "past_key_values"
    return lambda output: {name: output["cache"] if "cache" in output else output["past_key_values"]}


def _windows(cfg: Any, tokens: np.ndarray | None) -> tuple[torch.Tensor, str]:
    """(B, T) token ids to compare on: two consecutive val windows when there are enough, else random ids."""
    T = min(cfg.context_length, WINDOW)
    if tokens is not None and len(tokens) >= 2 * T:
        ids = torch.as_tensor(np.asarray(tokens[: 2 * T], dtype=np.int64)).view(2, T)
        return ids, "val tokens"
    if tokens is not None and len(tokens) >= 2:
        T = min(T, len(tokens))
        return torch.as_tensor(np.asarray(tokens[:T], dtype=np.int64))[None], "val tokens"
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, cfg.vocab_size, (2, T), generator=g), "random ids (no val tokens)"


def _sample_texts(tokenizer: Any, tokens: np.ndarray | None, n: int = 4, length: int = 64) -> list[str]:
    """Texts decoded from `n` windows of `length` val tokens, for the tokenizer comparison."""
    if tokens is None:
        return []
    return [tokenizer.decode([int(t) for t in tokens[i * length : (i + 1) * length]])
            for i in range(min(n, len(tokens) // length))]


def _row(output: str, where: str, got: torch.Tensor, ref: torch.Tensor, atol: float) -> ParityRow:
    diff = (got.float() - ref.float()).abs()
    max_abs = float(diff.max()) if diff.numel() else 0.0
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    max_rel = max_abs / scale if scale > 0 else 0.0
    return ParityRow(output, max_abs, max_rel, where, bool(np.isfinite(max_abs) and max_abs <= atol))


def _fold(total: ParityRow, row: ParityRow) -> None:
    """Keep the worst of `row` in `total`."""
    if row.max_abs >= total.max_abs or not total.worst:
        total.max_abs, total.worst = row.max_abs, row.worst
    total.max_rel = max(total.max_rel, row.max_rel)
    total.passed = total.passed and row.passed
