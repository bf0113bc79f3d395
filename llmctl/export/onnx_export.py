"""`llmctl export`'s engine: a `gpt` model dir -> an export dir holding one ONNX decoder graph.

(Classifier model dirs are exported by `llmctl.export.classifier_onnx`, through the same tracing
and opset handling, `trace_to_onnx`.)

The graph takes and returns the KV cache (HF Optimum names, see llmctl/models/onnx_model.py), so
one file serves prefill with an empty past, chunked prefill and decode, for left-padded batches.
It is written by `torch.onnx.export(dynamo=True)`, checked by `onnx.checker`, then run by ONNX
Runtime beside PyTorch (verify.py) before the directory is moved into place.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import onnx
import torch
import torch.nn as nn
from onnx import helper, numpy_helper

from llmctl.artifacts import ExportDir, staged_dir, write_json_atomic, write_failure
from llmctl.errors import EXIT_FAILURE, LlmctlError
from llmctl.models.gpt import GPT, rotary_cos_sin
from llmctl.models.onnx_model import input_names, output_names
from llmctl.progress import Progress, silent_if_none

MIN_OPSET = 17
EXPORTER_MIN_OPSET = 18  # torch 2.13's ONNX exporter has no lower implementations; 17 is reached by rewriting
PROTOBUF_LIMIT = 2**31 - 2**26  # an ONNX file is one protobuf (< 2 GiB); leave 64 MiB for the graph itself
OPTIMIZATION_LEVEL = "ORT_ENABLE_ALL"  # how OnnxCausalLM opens the graph (recorded in export.json)


@dataclass
class ExportReport:
    """What `export_onnx` did: whether the graph matched PyTorch, the parity table, figures, files written."""

    passed: bool
    failure: str | None
    rows: list[dict[str, Any]]  # the parity table: output, max_abs, max_rel, worst, passed
    figures: dict[str, Any] = field(default_factory=dict)
    paths: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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


def export_onnx(
    loaded: Any,
    out_dir: Path,
    *,
    opset: int = 17,
    external_data_threshold: int = 2 * 1024**3,
    atol: float = 1e-4,
    rtol: float | None = None,
    quantize: str | None = None,
    eval_tokens: np.ndarray | None = None,
    data: Path | None = None,
    progress: Progress | None = None,
) -> ExportReport:
    """Export a loaded `gpt` model dir to `out_dir` (model.onnx, export.json, ...), verified against PyTorch.

    A classifier model dir goes to `llmctl.export.classifier_onnx` (its parity and int8 checks use
    the val split of `data`, a classification dataset dir, or of the model's own dataset).

    Weights over `external_data_threshold` bytes (or near protobuf's 2 GiB, whatever the threshold)
    go to model.onnx.data. `quantize="int8"` also writes model.int8.onnx, judged by perplexity over
    `eval_tokens` (token ids) when given. An existing export dir at `out_dir` is replaced; any
    other non-empty directory is refused. A parity failure does not raise: the directory is
    written and the report (and export.json) say passed False, for the caller to exit 3 on. Bad
    arguments raise LlmctlError before any work, a failed export LlmctlError with exit code 1;
    either way nothing is left under `out_dir`.
    """
    out_dir = Path(out_dir)
    quantize = None if quantize in (None, "none") else quantize
    if getattr(loaded.model, "task", None) == "classification":
        from llmctl.export.classifier_onnx import export_classifier_onnx

        return export_classifier_onnx(
            loaded, out_dir, opset=opset, external_data_threshold=external_data_threshold, atol=atol, rtol=rtol,
            quantize=quantize, data=data, progress=progress,
        )
    _check_request(loaded, out_dir, opset, quantize, atol, rtol, eval_tokens)
    progress = silent_if_none(progress)
    model, source_quantization = fp32_model(loaded)
    seconds: dict[str, float] = {}

    with staged_dir(out_dir, f"the export dir {out_dir}") as tmp:
        layout = ExportDir(tmp)
        progress.stage(f"exporting the graph (torch.onnx.export, dynamo, opset {opset})")
        start = time.perf_counter()
        graph = _export_graph(model, layout.onnx, opset, external_data_threshold)
        seconds["export"] = time.perf_counter() - start
        loaded.tokenizer.save(str(layout.tokenizer))
        write_json_atomic(layout.config, loaded.config)
        write_json_atomic(layout.provenance, loaded.provenance)
        manifest = _manifest(loaded, model, opset, graph, source_quantization)
        write_json_atomic(layout.manifest, manifest)  # OnnxCausalLM needs it to open the graph below

        progress.stage("verifying against PyTorch (left-padded batch, cached decode steps, greedy tokens)", unit="steps")
        from llmctl.export.verify import verify_parity
        from llmctl.models.onnx_model import OnnxCausalLM

        start = time.perf_counter()
        onnx_model = OnnxCausalLM(tmp)
        parity = verify_parity(model, onnx_model, atol=atol, rtol=rtol, tokens=eval_tokens, on_progress=progress.update)
        del onnx_model
        seconds["verify"] = time.perf_counter() - start
        reference = "PyTorch fp32" + (", dequantized from the model dir's integer weights" if source_quantization else "")
        manifest["verification"] = {"reference": reference, **parity.to_dict()}

        if quantize == "int8":
            from llmctl.export.onnx_quant import quantize_int8

            start = time.perf_counter()
            manifest["int8"] = quantize_int8(
                tmp, model, external_data=graph["external_data"], eval_tokens=eval_tokens, progress=progress
            )
            manifest["files"]["int8"] = manifest["int8"]["file"]
            manifest["files"]["int8_data"] = manifest["int8"]["data_file"]
            seconds["int8"] = time.perf_counter() - start
        manifest["seconds"] = seconds
        write_json_atomic(layout.manifest, manifest)

    return export_report(out_dir, graph, manifest, parity, ("opset", "parameters", "weight_bytes", "seconds", "int8"))


def export_report(out_dir: Path, graph: dict[str, Any], manifest: dict[str, Any], parity: Any,
                  figure_keys: tuple[str, ...]) -> ExportReport:
    """The ExportReport of a finished export dir: its files, the manifest's `figure_keys` and the parity table."""
    final = ExportDir(out_dir)
    paths = {"dir": str(final.path), "model": str(final.onnx), "export_json": str(final.manifest)}
    if graph["external_data"]:
        paths["model_data"] = str(final.path / graph["data_file"])
    if "int8" in manifest.get("files", {}):
        paths["int8"] = str(final.onnx_int8)
        if manifest["files"]["int8_data"]:
            paths["int8_data"] = str(final.path / manifest["files"]["int8_data"])
    figures = {k: v for k, v in manifest.items() if k in figure_keys}
    figures["verification"] = {k: v for k, v in manifest["verification"].items() if k not in ("passed", "failure", "rows")}
    return ExportReport(parity.passed, parity.failure, [r.to_dict() for r in parity.rows], figures, paths)


def _check_request(
    loaded: Any, out_dir: Path, opset: int, quantize: str | None, atol: float, rtol: float | None, eval_tokens: Any
) -> None:
    """Refuse bad arguments before any work, naming the one to change."""
    check_common_request(out_dir, opset, quantize, atol, rtol)
    vocab = loaded.config.get("vocab_size")
    if eval_tokens is not None and (len(eval_tokens) < 2 or (vocab and int(np.max(eval_tokens)) >= vocab)):
        raise LlmctlError(
            f"eval tokens: need at least 2 token ids below the model's vocab_size {vocab}; got {len(eval_tokens)} "
            f"ids up to {int(np.max(eval_tokens)) if len(eval_tokens) else None}. Were they made by another tokenizer?"
        )
    family = loaded.config.get("family", "gpt")
    if family != "gpt":
        raise LlmctlError(f"{loaded.path}: family {family!r} cannot be exported to ONNX yet; only family gpt can.")


def check_common_request(out_dir: Path, opset: int, quantize: str | None, atol: float, rtol: float | None) -> None:
    """Refuse an opset, --quantize, tolerance or output path no export takes, before any work."""
    if opset < MIN_OPSET:
        raise LlmctlError(f"--opset {opset}: the exported graph needs opset {MIN_OPSET} or newer.")
    newest = onnx.defs.onnx_opset_version()
    if opset > newest:
        raise LlmctlError(f"--opset {opset}: the installed onnx {onnx.__version__} knows opsets up to {newest}.")
    if quantize not in (None, "int8"):
        raise LlmctlError(f"--quantize {quantize}: expected int8 (or none).")
    if not atol >= 0 or (rtol is not None and not rtol >= 0):
        raise LlmctlError(f"--atol {atol} / --rtol {rtol}: tolerances must be 0 or more.")
    if out_dir.is_file():
        raise LlmctlError(f"{out_dir}: is a file; the export writes a directory (model.onnx and more) there.")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not ExportDir(out_dir).is_export():
        raise LlmctlError(
            f"{out_dir}: exists and is not an export dir (no export.json); choose a new directory, "
            "as the export replaces the whole directory."
        )


def fp32_model(loaded: Any) -> tuple[Any, dict[str, Any] | None]:
    """The fp32 CPU model to export (a `gpt` or a classifier), and the quantization it was dequantized
    from (None: it was float).

    ONNX Runtime's int8 is its own (--quantize int8), and an HF dir holds float weights, so a quantized
    model dir is exported as the float model its integer weights stand for, rounding kept.
    """
    model, quantization = loaded.model, loaded.config.get("quantization")
    if quantization and getattr(model, "task", None) == "classification":
        from llmctl.compression.classifier_quant import dequantize_classifier

        model = dequantize_classifier(model)
    elif quantization:
        from llmctl.compression.quantization import dequantize

        model = dequantize(model)
    if any(p.device.type != "cpu" or p.dtype != torch.float32 for p in model.parameters()):
        model = copy.deepcopy(model).to("cpu", torch.float32)
    return model.eval(), quantization or None


def _export_graph(model: GPT, path: Path, opset: int, external_data_threshold: int) -> dict[str, Any]:
    """Trace `model` into `path` (+ path.data when its weights are over the threshold); returns the graph's figures."""
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


def trace_to_onnx(
    module: nn.Module,
    args: tuple[Any, ...],
    path: Path,
    *,
    opset: int,
    dynamic_shapes: dict[str, Any],
    input_names: list[str],
    output_names: list[str],
    external_data_threshold: int,
    rename_dims: list[tuple[str, int, str]] = (),
) -> dict[str, Any]:
    """Trace `module(*args)` with torch.onnx.export(dynamo=True) into `path` (+ path.data when its weights
    are over the threshold), at `opset` (rewritten from 18 when lower), checked by onnx.checker.

    Returns the graph's figures: external_data, data_file, weight_bytes (bytes), inputs, outputs.
    """
    try:
        with _quiet_exporter(), torch.no_grad():
            program = torch.onnx.export(
                module, args, dynamo=True, verbose=False,
                dynamic_shapes=dynamic_shapes, opset_version=max(opset, EXPORTER_MIN_OPSET),
                input_names=input_names, output_names=output_names,
            )
            program.save(str(path), external_data=True)
    except Exception as e:  # torch.export and onnxscript raise many types; all mean "this did not export"
        if write_failure(e, "the ONNX graph", path) is not None:
            raise  # a full disk or a refused permission: the export dir's writer names it
        raise LlmctlError(
            f"torch.onnx.export failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
            kind="export_failed", exit_code=EXIT_FAILURE,
        ) from e

    data_file = path.name + ".data"
    proto = onnx.load(str(path), load_external_data=False)
    written = next(i.version for i in proto.opset_import if i.domain in ("", "ai.onnx"))
    if written != max(opset, EXPORTER_MIN_OPSET):
        raise LlmctlError(
            f"--opset {opset}: torch's exporter could not convert the graph to it (it kept opset {written}); "
            f"choose a lower --opset ({MIN_OPSET} and {EXPORTER_MIN_OPSET} always work).",
            kind="export_failed", exit_code=EXIT_FAILURE,
        )
    for graph in _graphs(proto.graph):
        for node in graph.node:
            del node.metadata_props[:]  # the tracer's stack traces: this machine's paths, half a small model's file
    for input_name, axis, name in rename_dims:
        _rename_dim(proto, input_name, axis, name)
    if opset < EXPORTER_MIN_OPSET:
        _downgrade_to_opset_17(proto)
    weight_bytes = _initializer_bytes(proto)
    external = weight_bytes > min(external_data_threshold, PROTOBUF_LIMIT)
    if external:
        onnx.save(proto, str(path))  # the tensors still point at path.data
    else:
        onnx.load_external_data_for_model(proto, str(path.parent))
        onnx.save(proto, str(path))
        path.with_name(data_file).unlink(missing_ok=True)
    try:
        onnx.checker.check_model(str(path))  # the path form reads external data too
    except onnx.checker.ValidationError as e:
        raise LlmctlError(
            f"the exported graph fails onnx.checker: {e}", kind="export_failed", exit_code=EXIT_FAILURE
        ) from None
    return {
        "external_data": external,
        "data_file": data_file if external else None,
        "weight_bytes": weight_bytes,
        "inputs": [_value_spec(v) for v in proto.graph.input],
        "outputs": [_value_spec(v) for v in proto.graph.output],
    }


def _graphs(graph: Any) -> Iterator[Any]:
    """`graph` and every subgraph nested in its nodes' attributes (Scan, Loop and If bodies), outermost first."""
    yield graph
    for node in graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for g in a.graphs:
                    yield from _graphs(g)


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Keep the exporter's progress lines off stdout (`--json` owns it) and its known-harmless warnings off stderr."""
    # torch.onnx: "torchvision is not installed. Skipping torchvision::nms", ...; onnxscript: a
    # traceback when a version conversion fails, which the opset check after export reports instead.
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "The axis name: batch will not be used, since ..."
            warnings.simplefilter("ignore", FutureWarning)  # pytree's LeafSpec deprecation, inside torch
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _rename_dim(proto: Any, input_name: str, axis: int, new: str) -> None:
    """Give an input's symbolic axis a readable name, everywhere that symbol appears."""
    dim = next(v for v in proto.graph.input if v.name == input_name).type.tensor_type.shape.dim[axis]
    old = dim.dim_param
    if not old:
        return
    for value in (*proto.graph.input, *proto.graph.output, *proto.graph.value_info):
        for d in value.type.tensor_type.shape.dim:
            if d.dim_param == old:
                d.dim_param = new


def _downgrade_to_opset_17(proto: Any) -> None:
    """Rewrite the opset-18 forms torch's exporter writes (Reduce* axes as an input, Split num_outputs) as opset 17's.

    Subgraphs (the Scan body of a tanh RNN classifier) are rewritten too, each node seeing the
    initializers and shapes of its own graph and the graphs around it. Any other op whose
    definition changed at 18 is refused, naming it, rather than guessed at.
    """
    if proto.functions:
        raise LlmctlError(
            "the exported graph has functions, which the opset-17 rewrite does not cover; export with --opset 18.",
            kind="export_failed", exit_code=EXIT_FAILURE,
        )
    _downgrade_graph(proto.graph, {}, {})
    for imp in proto.opset_import:
        if imp.domain in ("", "ai.onnx"):
            imp.version = 17


def _downgrade_graph(graph: Any, outer_initializers: dict[str, Any], outer_shapes: dict[str, Any]) -> None:
    initializers = {**outer_initializers, **{t.name: t for t in graph.initializer}}
    shapes = {**outer_shapes, **{v.name: v.type.tensor_type.shape for v in (*graph.input, *graph.output, *graph.value_info)}}
    for node in graph.node:
        for a in node.attribute:
            nested = [a.g] if a.type == onnx.AttributeProto.GRAPH else a.graphs if a.type == onnx.AttributeProto.GRAPHS else []
            for sub in nested:
                _downgrade_graph(sub, initializers, shapes)
        if node.domain not in ("", "ai.onnx"):
            continue
        try:
            at_17, at_18 = (onnx.defs.get_schema(node.op_type, v).since_version for v in (17, 18))
            changed = at_17 != at_18
        except onnx.defs.SchemaError:
            changed = True  # the op does not exist at opset 17
        if not changed:
            continue
        attrs = {a.name: a for a in node.attribute}
        if node.op_type.startswith("Reduce") and _reduce_axes_to_attribute(node, attrs, initializers):
            continue
        if node.op_type == "Split" and _split_without_num_outputs(node, attrs, shapes):
            continue
        raise LlmctlError(
            f"the exported graph uses {node.op_type} in a form opset 17 cannot express; export with --opset 18.",
            kind="export_failed", exit_code=EXIT_FAILURE,
        )


def _reduce_axes_to_attribute(node, attrs, initializers) -> bool:
    noop = attrs.get("noop_with_empty_axes")
    if noop is not None:
        if noop.i:
            return False  # "reduce nothing" has no opset-17 spelling
        node.attribute.remove(noop)
    if len(node.input) < 2 or not node.input[1]:
        return True  # no axes: reduce all, the same in both
    axes = initializers.get(node.input[1])
    if axes is None:
        return False
    node.attribute.append(helper.make_attribute("axes", [int(a) for a in numpy_helper.to_array(axes).ravel()]))
    del node.input[1]
    return True


def _split_without_num_outputs(node: Any, attrs: dict[str, Any], shapes: dict[str, Any]) -> bool:
    """Opset 17's Split without a `split` input cuts into equal parts: the same when the axis divides evenly."""
    n = attrs.get("num_outputs")
    if n is None:
        return True
    shape = shapes.get(node.input[0])
    axis = attrs["axis"].i if "axis" in attrs else 0
    if shape is None or not shape.dim:
        return False
    size = shape.dim[axis].dim_value
    if not size or size % n.i:
        return False
    node.attribute.remove(n)
    return True


def _initializer_bytes(proto: Any) -> int:
    """Bytes of the graph's weights, whether stored inline or as external data."""
    total = 0
    for t in proto.graph.initializer:
        external = {e.key: e.value for e in t.external_data}
        total += int(external["length"]) if "length" in external else len(t.raw_data)
    return total


def _value_spec(value: Any) -> dict[str, Any]:
    t = value.type.tensor_type
    return {
        "name": value.name,
        "dtype": str(helper.tensor_dtype_to_np_dtype(t.elem_type)),
        "axes": [d.dim_param or d.dim_value for d in t.shape.dim],
    }


def _manifest(loaded: Any, model: GPT, opset: int, graph: dict[str, Any], source_quantization: Any) -> dict[str, Any]:
    """export.json without the verification figures (added once they are measured)."""
    import onnxruntime

    layout = ExportDir(Path("."))
    files = {
        "model": layout.onnx.name,
        "model_data": graph["data_file"],
        "int8": None,
        "int8_data": None,
        "tokenizer": layout.tokenizer.name,
        "config": layout.config.name,
        "provenance": layout.provenance.name,
    }
    cfg = model.config
    return {
        "format": "onnx",
        "opset": opset,
        "exporter": {
            "method": "torch.onnx.export(dynamo=True)" + (", rewritten from opset 18" if opset < EXPORTER_MIN_OPSET else ""),
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__,
        },
        "source": {
            "model_dir": str(Path(loaded.path).resolve()),
            "family": loaded.config.get("family", "gpt"),
            "step": loaded.provenance.get("step"),
        },
        "source_quantization": source_quantization,
        "parameters": model.num_parameters(),
        "weight_bytes": graph["weight_bytes"],
        "external_data": graph["external_data"],
        "decoder": {
            "n_layer": cfg.n_layer,
            "n_kv_head": cfg.n_kv_head,
            "head_size": cfg.head_size,
            "vocab_size": cfg.vocab_size,
            "context_length": cfg.context_length,
        },
        "inputs": graph["inputs"],
        "outputs": graph["outputs"],
        "files": files,
        "runtime": {"providers": ["CPUExecutionProvider"], "graph_optimization_level": OPTIMIZATION_LEVEL},
    }
