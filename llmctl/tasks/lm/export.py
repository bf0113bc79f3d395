"""`llmctl export` of a language model: one ONNX decoder graph with a KV cache, or a Hugging Face dir.

The graph takes and returns the KV cache (HF Optimum names, see llmctl/models/onnx_model.py), so
one file serves prefill with an empty past, chunked prefill and decode, for left-padded batches.
It is traced from `DecoderGraph` through the neutral skeleton (`llmctl.export.onnx_export`), then
run by ONNX Runtime beside PyTorch (`llmctl.tasks.lm.parity`) before the directory is moved into
place. `--quantize int8` also writes model.int8.onnx, judged by perplexity over the val split.
`--format hf` writes a Hugging Face Llama dir (`llmctl.export.hf_export`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from llmctl.config.schema import ExportConfig
from llmctl.errors import LlmctlError
from llmctl.export.onnx_export import export_onnx_dir
from llmctl.export.onnx_graph import trace_to_onnx
from llmctl.export.onnx_quant import WEIGHT_SCALES, int8_candidates
from llmctl.export.report import ExportReport
from llmctl.export.verify import ParityResult
from llmctl.models.gpt import GPT, rotary_cos_sin
from llmctl.models.onnx_model import OnnxCausalLM, input_names, output_names
from llmctl.progress import OnProgress, Progress, silent_if_none

VAL_TOKENS = 16384  # val tokens that judge the int8 graph and the Hugging Face dir, at most


class DecoderGraph(nn.Module):
    """The `gpt` forward with the cache and mask as plain tensors, for tracing.

    Sizes are never branched on in Python: an empty past (P = 0) is a (B, nkv, 0, hs) tensor, and
    the causal + padding mask is arithmetic on positions, so one trace serves every B, P and T.
    Submodules keep the torch model's names, so the graph's weights carry HF Llama names.
    """

    def __init__(self, gpt: GPT):
        super().__init__()
        self.model = gpt.model
        self.lm_head = gpt.lm_head
        self.head_size = gpt.config.head_size
        self.rope_theta = gpt.config.rope_theta

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        past_key_values: list[tuple[torch.Tensor, torch.Tensor]],
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        T, S = input_ids.shape[1], attention_mask.shape[1]
        key_pos = torch.arange(S, device=input_ids.device)  # (S,)
        query_pos = torch.arange(T, device=input_ids.device) + (S - T)  # (T,): the new tokens are the last T keys
        causal = key_pos[None, :] <= query_pos[:, None]  # (T, S)
        own = key_pos[None, :] == query_pos[:, None]  # (T, S): a padding query still sees itself, so no NaN
        mask = (causal[None, None] & attention_mask.bool()[:, None, None, :]) | own[None, None]  # (B, 1, T, S)
        cos, sin = rotary_cos_sin(position_ids, self.head_size, self.rope_theta)
        x = self.model.embed_tokens(input_ids)  # (B, T, C)
        presents = []
        for layer, past in zip(self.model.layers, past_key_values):
            x, present = layer(x, cos, sin, past, mask)
            presents.append(present)
        return self.lm_head(self.model.norm(x)), presents  # (B, T, V), per layer (B, nkv, S, hs) twice


def export(loaded: Any, out_dir: Path, options: ExportConfig, *, data: Path | None = None,
           progress: Progress | None = None) -> ExportReport:
    """The export `options` (the recipe's export section) asks for: the ONNX graph, or with format hf a
    Hugging Face dir. The val split of `data` (else of the model's own dataset) judges the int8 graph and
    the Hugging Face dir; without one a note says what is not measured."""
    from llmctl.evaluation.profile import val_tokens_of

    progress = silent_if_none(progress)
    if options.format == "hf":
        from llmctl.export.hf_export import export_hf

        tokens, _, missing = val_tokens_of(loaded, data, VAL_TOKENS)
        if missing:
            progress.note(f"no val tokens: comparing on random ids ({missing})")
        return export_hf(loaded, out_dir, atol=options.atol, eval_tokens=tokens, progress=progress)
    tokens = None
    if options.quantize == "int8":
        tokens, _, missing = val_tokens_of(loaded, data, VAL_TOKENS)
        if missing:
            progress.note(f"the int8 graph's perplexity will not be measured: {missing}")
    return export_onnx(loaded, out_dir, opset=options.opset, atol=options.atol, quantize=options.quantize,
                       external_data_threshold=int(options.external_data_mb * 1e6), eval_tokens=tokens,
                       progress=progress)


def export_onnx(loaded: Any, out_dir: Path, *, opset: int = 17, external_data_threshold: int = 2 * 1024**3,
                atol: float = 1e-4, rtol: float | None = None, quantize: str | None = None,
                eval_tokens: np.ndarray | None = None, progress: Progress | None = None) -> ExportReport:
    """Export a loaded `gpt` model dir to `out_dir` (model.onnx, export.json, ...), verified against PyTorch.

    Parity prompts are cut from `eval_tokens` (token ids) when given, and `quantize="int8"`'s graph is
    judged by perplexity over them; otherwise random ids and logits. The rest (files, refusals, what a
    failure leaves) is `llmctl.export.onnx_export.export_onnx_dir`'s.
    """
    from llmctl.tasks import task_of_config

    return export_onnx_dir(
        loaded, out_dir, DecoderExport(task_of_config(loaded.config).name, eval_tokens), opset=opset,
        external_data_threshold=external_data_threshold, atol=atol, rtol=rtol, quantize=quantize, progress=progress,
    )


def open_onnx(export_dir: Path, file: str = "model.onnx", *, spin_threads: bool = True) -> OnnxCausalLM:
    """The decoder graph `file` of an export dir in ONNX Runtime, called like the torch `gpt` model."""
    return OnnxCausalLM(export_dir, file, spin_threads=spin_threads)


class DecoderExport:
    """The `OnnxExport` of a `gpt` language model (see llmctl.export.onnx_export)."""

    figure_keys = ("opset", "parameters", "weight_bytes", "seconds", "int8")
    dequantized_from = "integer weights"

    def __init__(self, task: str, eval_tokens: np.ndarray | None):
        self.task = task
        self.eval_tokens = eval_tokens

    def prepare(self, loaded: Any) -> None:
        tokens, vocab = self.eval_tokens, loaded.config.get("vocab_size")
        if tokens is not None and (len(tokens) < 2 or (vocab and int(np.max(tokens)) >= vocab)):
            raise LlmctlError(
                f"eval tokens: need at least 2 token ids below the model's vocab_size {vocab}; got {len(tokens)} "
                f"ids up to {int(np.max(tokens)) if len(tokens) else None}. Were they made by another tokenizer?"
            )
        family = loaded.config.get("family", "gpt")
        if family != "gpt":
            raise LlmctlError(f"{loaded.path}: family {family!r} cannot be exported to ONNX yet; only family gpt can.")

    def dequantize(self, model: nn.Module) -> nn.Module:
        from llmctl.compression.quantization import dequantize

        return dequantize(model)

    def trace(self, model: GPT, path: Path, *, opset: int, external_data_threshold: int) -> dict[str, Any]:
        cfg = model.config
        # torch.export specialises sizes 0 and 1, so trace with every size above 1.
        B, P, T = 2, 3, 4
        ids = torch.randint(0, cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(0))
        mask = torch.ones(B, P + T, dtype=torch.int64)
        pos = torch.arange(P, P + T).expand(B, T).contiguous()
        past = [(torch.randn(B, cfg.n_kv_head, P, cfg.head_size), torch.randn(B, cfg.n_kv_head, P, cfg.head_size))
                for _ in range(cfg.n_layer)]  # (B, nkv, P, hs) each
        batch, seq, past_seq = torch.export.Dim("batch"), torch.export.Dim("sequence"), torch.export.Dim("past_sequence")
        kv = {0: batch, 2: past_seq}
        dynamic_shapes = {
            "input_ids": {0: batch, 1: seq},
            "attention_mask": {0: batch, 1: torch.export.Dim.AUTO},  # P + T; renamed below
            "position_ids": {0: batch, 1: seq},
            "past_key_values": [(kv, kv) for _ in range(cfg.n_layer)],
        }
        return trace_to_onnx(
            DecoderGraph(model).eval(), (ids, mask, pos, past), path, opset=opset, dynamic_shapes=dynamic_shapes,
            input_names=input_names(cfg.n_layer), output_names=output_names(cfg.n_layer),
            external_data_threshold=external_data_threshold,
            rename_dims=[("attention_mask", 1, "past_sequence + sequence")],
        )

    def config(self, loaded: Any) -> dict[str, Any]:
        return loaded.config

    def manifest(self, loaded: Any, model: GPT, graph_path: Path) -> dict[str, Any]:
        cfg = model.config
        return {"decoder": {"n_layer": cfg.n_layer, "n_kv_head": cfg.n_kv_head, "head_size": cfg.head_size,
                            "vocab_size": cfg.vocab_size, "context_length": cfg.context_length}}

    def verify(self, model: GPT, export_dir: Path, *, atol: float, rtol: float | None,
               progress: Progress) -> tuple[ParityResult, dict[str, Any]]:
        from llmctl.tasks.lm.parity import verify_parity

        progress.stage("verifying against PyTorch (left-padded batch, cached decode steps, greedy tokens)", unit="steps")
        onnx_model = OnnxCausalLM(export_dir)
        parity = verify_parity(model, onnx_model, atol=atol, rtol=rtol, tokens=self.eval_tokens,
                               on_progress=progress.update)
        del onnx_model  # let ONNX Runtime release the file before the dir moves
        return parity, {}

    def quantize_int8(self, export_dir: Path, model: GPT, *, external_data: bool, progress: Progress) -> dict[str, Any]:
        return quantize_int8(export_dir, model, external_data=external_data, eval_tokens=self.eval_tokens,
                             progress=progress)

    def summary(self, report: ExportReport) -> list[str]:
        lines = [int8_line(report.figures["int8"])] if report.figures.get("int8") else []
        files = ", ".join(Path(p).name for k, p in report.paths.items() if k != "dir")
        return [*lines, f"wrote {report.paths['dir']} ({files})"]


def quantize_int8(
    export_dir: Path,
    reference: Any,
    *,
    external_data: bool,
    eval_tokens: np.ndarray | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Write `export_dir`/model.int8.onnx from its model.onnx and return its figures for export.json.

    `reference` is the fp32 torch model. With `eval_tokens` each candidate is judged by its
    perplexity over them (the one nearer fp32 wins); without, by its mean |logit - fp32 logit| on a seeded
    random prompt, and perplexity is recorded as not measured.
    """
    progress = silent_if_none(progress)
    with int8_candidates(export_dir, external_data=external_data, progress=progress) as candidates:
        vocab_size = reference.config.vocab_size
        reference_ppl = None
        if eval_tokens is not None:
            progress.stage(f"int8: perplexity of the fp32 model over {len(eval_tokens) - 1:,} tokens", unit="tokens")
            reference_ppl = _perplexity(reference, eval_tokens, vocab_size, progress.update)
        else:
            probe = torch.randint(0, vocab_size, (1, min(64, reference.context_length)),
                                  generator=torch.Generator().manual_seed(0))  # (1, T)
            with torch.no_grad():
                probe_logits = reference(probe)  # (1, T, V)

        scores: dict[str, dict[str, Any]] = {}
        for scheme in WEIGHT_SCALES:
            progress.stage(f"int8: quantizing ({scheme} weight scales)")
            model = OnnxCausalLM(candidates.layout.path, candidates.make(scheme))
            if reference_ppl is not None:
                progress.stage(f"int8: perplexity ({scheme})", unit="tokens")
                ppl = _perplexity(model, eval_tokens, vocab_size, progress.update)
                delta = ppl - reference_ppl
                scores[scheme] = {"perplexity": ppl, "perplexity_delta": delta, "score": abs(delta)}
            else:
                err = float((model(probe) - probe_logits).abs().mean())
                scores[scheme] = {"logits_mean_abs_diff": err, "score": err}
            del model  # let ONNX Runtime release the file before it moves

        chosen = min(scores, key=lambda s: scores[s]["score"])
        figures = candidates.keep(chosen)
    figures["candidates"] = {s: {k: v for k, v in c.items() if k != "score"} for s, c in scores.items()}
    if reference_ppl is not None:
        figures["perplexity"] = {
            "eval_tokens": int(len(eval_tokens)),
            "fp32": reference_ppl,
            "int8": scores[chosen]["perplexity"],
            "delta": scores[chosen]["perplexity_delta"],
            "relative_delta": scores[chosen]["perplexity_delta"] / reference_ppl,
        }
    else:
        figures["perplexity"] = "not measured: no eval tokens were given"
    return figures


def int8_line(int8: dict[str, Any]) -> str:
    """The int8 graph's size and perplexity, as one line for people."""
    text = f"int8: {int8['file']} is {1 / int8['size_ratio']:.2f}x the fp32 size ({int8['weight_scales']} scales)"
    ppl = int8.get("perplexity")
    if isinstance(ppl, dict):
        text += (f"; perplexity {ppl['fp32']:.3f} -> {ppl['int8']:.3f} ({100 * ppl['relative_delta']:+.2f}%) "
                 f"on {ppl['eval_tokens']:,} val tokens")
    else:
        text += f"; perplexity {ppl}"
    return text


def _perplexity(model: Any, tokens: np.ndarray, vocab_size: int, on_progress: OnProgress) -> float:
    from llmctl.evaluation.perplexity import evaluate_tokens

    no_bytes = np.ones(vocab_size, dtype=np.int64)  # bits per byte is not wanted here, only perplexity
    return evaluate_tokens(model, tokens, no_bytes, source="export int8 check", batch_size=1,
                          on_progress=on_progress).perplexity
