"""ONNX graphs as every task's export writes them: tracing a module, the opset, walking a graph.

`trace_to_onnx` runs `torch.onnx.export(dynamo=True)` (its progress off stdout), writes the weights
inline or, when large, to `path.data`, rewrites torch's opset-18 forms as opset 17's when asked,
strips the tracer's stack traces and checks the result with onnx.checker. A task's export module
builds the module to trace and its example inputs; everything about the file is done here once.
"""

from __future__ import annotations

import collections
import contextlib
import io
import logging
import warnings
from pathlib import Path
from typing import Any, Iterator

import onnx
import torch
import torch.nn as nn
from onnx import helper, numpy_helper

from llmctl.artifacts import write_failure
from llmctl.errors import EXIT_FAILURE, LlmctlError

MIN_OPSET = 17
EXPORTER_MIN_OPSET = 18  # torch 2.13's ONNX exporter has no lower implementations; 17 is reached by rewriting
PROTOBUF_LIMIT = 2**31 - 2**26  # an ONNX file is one protobuf (< 2 GiB); leave 64 MiB for the graph itself


def exporter_figures(opset: int) -> dict[str, str]:
    """export.json's `exporter`: how the graph was written, and the versions that wrote it."""
    import onnxruntime

    return {
        "method": "torch.onnx.export(dynamo=True)" + (", rewritten from opset 18" if opset < EXPORTER_MIN_OPSET else ""),
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


def op_counts(graph_path: Path) -> dict[str, int]:
    """How many nodes of each op type a graph has, its subgraphs (a Scan's body) included."""
    counts: collections.Counter[str] = collections.Counter()
    for graph in graphs(onnx.load(str(graph_path), load_external_data=False).graph):
        counts.update(n.op_type for n in graph.node)
    return dict(sorted(counts.items()))


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
    for graph in graphs(proto.graph):
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
        "inputs": [value_spec(v) for v in proto.graph.input],
        "outputs": [value_spec(v) for v in proto.graph.output],
    }


def graphs(graph: Any) -> Iterator[Any]:
    """`graph` and every subgraph nested in its nodes' attributes (Scan, Loop and If bodies), outermost first."""
    yield graph
    for node in graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from graphs(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for g in a.graphs:
                    yield from graphs(g)


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


def value_spec(value: Any) -> dict[str, Any]:
    t = value.type.tensor_type
    return {
        "name": value.name,
        "dtype": str(helper.tensor_dtype_to_np_dtype(t.elem_type)),
        "axes": [d.dim_param or d.dim_value for d in t.shape.dim],
    }
