"""ONNX export: the graph, its parity with PyTorch, external data, int8, refusals, and the ONNX Runtime model."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from llmctl.errors import LlmctlError
from llmctl.tasks.lm.export import export_onnx
from llmctl.tasks.lm.parity import verify_parity
from llmctl.models.generation import SamplingParams, generate
from llmctl.models.gpt import GPT, GPTConfig
from llmctl.models.model_dir import LoadedModel, load_model_dir, save_model_dir
from llmctl.models.loading import load_export_dir
from llmctl.models.onnx_model import OnnxCausalLM
from tests.conftest import TINY_MODEL, generated_text

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_model_dir(root: Path, seed: int = 0, **config) -> LoadedModel:
    from llmctl.data.tokenizer import train_tokenizer

    tok = train_tokenizer(generated_text(400).splitlines(), vocab_size=300, min_frequency=1,
                          special_tokens=["<|endoftext|>"])
    root.mkdir(parents=True, exist_ok=True)
    tok.save(str(root / "tokenizer.json"))
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**{**TINY_MODEL, **config})).eval()
    save_model_dir(model, root / "model", tokenizer_path=root / "tokenizer.json", provenance={"step": 20})
    return load_model_dir(root / "model")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One opset-17 export with int8, judged on real tokens: (loaded model dir, export dir, report)."""
    root = tmp_path_factory.mktemp("onnx")
    loaded = make_model_dir(root)
    eval_tokens = np.array(loaded.tokenizer.encode(generated_text(40, seed=7)).ids, dtype=np.uint16)
    report = export_onnx(loaded, root / "export", opset=17, quantize="int8", eval_tokens=eval_tokens)
    return loaded, root / "export", report


def left_padded(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, L = len(prompts), max(map(len, prompts))
    ids = torch.zeros(B, L, dtype=torch.int64)
    mask = torch.zeros(B, L, dtype=torch.int64)
    for b, p in enumerate(prompts):
        ids[b, L - len(p):], mask[b, L - len(p):] = torch.tensor(p), 1
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


# --- the graph and the export dir ------------------------------------------------------------------


def test_export_writes_a_checked_opset_17_graph_with_optimum_names_and_dynamic_axes(exported):
    loaded, out, report = exported
    assert report.passed and report.failure is None
    onnx.checker.check_model(str(out / "model.onnx"))
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "export.json", "llmctl.json", "model.int8.onnx", "model.onnx", "tokenizer.json"]
    manifest = json.loads((out / "export.json").read_text())
    assert manifest["format_version"] == 1 and manifest["opset"] == 17
    assert onnx.load(str(out / "model.onnx")).opset_import[0].version == 17
    inputs = {i["name"]: i["axes"] for i in manifest["inputs"]}
    assert inputs["input_ids"] == inputs["position_ids"] == ["batch", "sequence"]
    assert inputs["attention_mask"] == ["batch", "past_sequence + sequence"]
    assert inputs["past_key_values.1.value"] == ["batch", 2, "past_sequence", 16]
    outputs = {o["name"]: o["axes"] for o in manifest["outputs"]}
    assert list(outputs) == ["logits", "present.0.key", "present.0.value", "present.1.key", "present.1.value"]
    assert outputs["present.0.key"] == ["batch", 2, "past_sequence + sequence", 16]
    assert manifest["source"]["model_dir"] == str(loaded.path.resolve())
    assert manifest["verification"]["passed"] is True
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 300
    assert json.loads((out / "llmctl.json").read_text())["step"] == 20


def test_onnx_matches_torch_with_an_empty_past_and_cached_left_padded_steps(exported):
    loaded, out, report = exported
    torch_model, onnx_model = loaded.model, OnnxCausalLM(out)
    ids, mask, pos = left_padded([[5, 6, 7, 8, 9, 10], [11, 12], [13]])
    with torch.no_grad():
        ref, cache = torch_model(ids, position_ids=pos, attention_mask=mask, use_cache=True)
    got, onnx_cache = onnx_model(ids, position_ids=pos, attention_mask=mask, use_cache=True)  # P = 0
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    for _ in range(3):  # decode: P > 0, T = 1, each backend on its own cache
        nxt = ref[:, -1].argmax(-1, keepdim=True)  # (B, 1)
        mask = torch.cat((mask, torch.ones(3, 1, dtype=torch.int64)), dim=1)
        pos = pos[:, -1:] + 1
        with torch.no_grad():
            ref, cache = torch_model(nxt, cache, pos, mask, use_cache=True)
        got, onnx_cache = onnx_model(nxt, onnx_cache, pos, mask, use_cache=True)
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
        torch.testing.assert_close(onnx_cache[1][0], cache[1][0], rtol=0, atol=1e-5)
    single = torch.tensor([[42]])  # B = 1, P = 0, T = 1: the sizes torch.export specialises
    with torch.no_grad():
        torch.testing.assert_close(onnx_model(single), torch_model(single), rtol=0, atol=1e-5)
    assert [r["output"] for r in report.rows] == ["logits", "present.*.key", "present.*.value"]
    assert all(r["passed"] and r["max_abs"] < 1e-5 for r in report.rows)


def test_greedy_generation_gives_the_same_tokens_in_both_backends(exported):
    loaded, out, report = exported
    assert report.figures["verification"]["greedy"]["identical"] is True
    onnx_model = OnnxCausalLM(out)
    params = SamplingParams(max_new_tokens=10, temperature=0.0)
    for prompt in ([1, 2, 3, 4, 5], [7], list(range(20, 40))):
        assert generate(onnx_model, prompt, params) == generate(loaded.model, prompt, params)


def test_lowered_threshold_writes_external_data_that_loads_and_runs(tmp_path):
    loaded = make_model_dir(tmp_path, n_head=4, n_kv_head=1)  # grouped-query attention too
    report = export_onnx(loaded, tmp_path / "export", opset=18, external_data_threshold=1, quantize="int8")
    assert report.passed, report.failure
    out = tmp_path / "export"
    assert (out / "model.onnx.data").stat().st_size > (out / "model.onnx").stat().st_size
    onnx.checker.check_model(str(out / "model.onnx"))
    manifest = json.loads((out / "export.json").read_text())
    assert manifest["opset"] == 18 and manifest["external_data"] is True
    assert manifest["files"]["model_data"] == "model.onnx.data"
    assert manifest["files"]["int8_data"] == "model.int8.onnx.data" and (out / "model.int8.onnx.data").is_file()
    assert manifest["int8"]["perplexity"].startswith("not measured")
    assert report.paths["model_data"] == str(out / "model.onnx.data")
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    with torch.no_grad():
        ref = loaded.model(ids)
    torch.testing.assert_close(OnnxCausalLM(out)(ids), ref, rtol=0, atol=1e-5)
    assert (OnnxCausalLM(out, "model.int8.onnx")(ids) - ref).abs().max() < 0.1


# --- refusals --------------------------------------------------------------------------------------


def test_opset_16_is_refused_before_any_work(tmp_path, tiny_gpt):
    loaded = LoadedModel(tiny_gpt(), {"family": "gpt"}, None, {}, tmp_path)
    with pytest.raises(LlmctlError, match="opset 17 or newer"):
        export_onnx(loaded, tmp_path / "export", opset=16)
    assert list(tmp_path.iterdir()) == []


def test_an_out_dir_that_is_a_file_is_refused_and_nothing_is_written(tmp_path, tiny_gpt):
    target = tmp_path / "export"
    target.write_text("not a dir")
    loaded = LoadedModel(tiny_gpt(), {"family": "gpt"}, None, {}, tmp_path)
    with pytest.raises(LlmctlError, match="is a file"):
        export_onnx(loaded, target)
    assert list(tmp_path.iterdir()) == [target] and target.read_text() == "not a dir"


def test_an_existing_dir_that_is_not_an_export_dir_is_not_replaced(tmp_path, tiny_gpt):
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep me")
    loaded = LoadedModel(tiny_gpt(), {"family": "gpt"}, None, {}, tmp_path)
    with pytest.raises(LlmctlError, match="not an export dir"):
        export_onnx(loaded, tmp_path / "precious")
    assert (tmp_path / "precious" / "notes.txt").read_text() == "keep me"


def test_a_quantized_model_dir_exports_its_dequantized_weights_and_records_the_scheme(tmp_path):
    from llmctl.compression.quantization import quantize_model

    loaded = make_model_dir(tmp_path)
    save_model_dir(quantize_model(loaded.model, "int8"), tmp_path / "int8", tokenizer_path=tmp_path / "tokenizer.json",
                   provenance={})
    report = export_onnx(load_model_dir(tmp_path / "int8"), tmp_path / "export")
    assert report.passed, report.failure
    manifest = json.loads((tmp_path / "export" / "export.json").read_text())
    assert manifest["source_quantization"] == {"scheme": "int8"}
    assert "dequantized" in manifest["verification"]["reference"]


def test_an_exporter_failure_is_a_clear_error_and_leaves_no_partial_dir(tmp_path, monkeypatch):
    loaded = make_model_dir(tmp_path / "src")

    def broken_export(*args, **kwargs):
        raise RuntimeError("Could not guard on data-dependent expression u0 > 1")

    monkeypatch.setattr(torch.onnx, "export", broken_export)
    with pytest.raises(LlmctlError, match="torch.onnx.export failed: RuntimeError: Could not guard") as caught:
        export_onnx(loaded, tmp_path / "out" / "export")
    assert caught.value.exit_code == 1
    assert list((tmp_path / "out").iterdir()) == []  # the staging dir is gone too


# --- the parity gate -------------------------------------------------------------------------------


def test_a_weight_changed_after_export_fails_parity_naming_the_output(exported):
    loaded, out, _ = exported
    changed = copy.deepcopy(loaded.model)
    with torch.no_grad():
        changed.model.norm.weight.mul_(1.01)  # the final norm: only the logits can change
    result = verify_parity(changed, OnnxCausalLM(out), atol=1e-4)
    assert not result.passed
    assert result.failure.startswith("ONNX Runtime and PyTorch disagree: logits differs by up to")
    assert "--opset 18" in result.failure and "--atol" in result.failure
    rows = {r.output: r.passed for r in result.rows}
    assert rows == {"logits": False, "present.*.key": True, "present.*.value": True}


def test_a_graph_that_cannot_run_some_sizes_fails_parity_instead_of_crashing(exported):
    loaded, out, _ = exported
    onnx_model = OnnxCausalLM(out)

    def only_prefill(ids, past_key_values=None, *args, **kwargs):
        if past_key_values:
            raise RuntimeError("[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : Got invalid dimensions")
        return onnx_model(ids, past_key_values, *args, **kwargs)

    result = verify_parity(loaded.model, only_prefill, atol=1e-4)
    assert not result.passed
    assert "ONNX Runtime cannot run left-padded batch step 1 (B=3, P=12, T=1)" in result.failure


def test_a_failed_gate_is_reported_and_recorded_but_the_dir_is_still_written(tmp_path):
    loaded = make_model_dir(tmp_path)
    report = export_onnx(loaded, tmp_path / "export", atol=0.0)  # fp32 kernels differ in the last bits
    assert not report.passed
    assert "disagree" in report.failure and "atol 0" in report.failure
    manifest = json.loads((tmp_path / "export" / "export.json").read_text())
    assert manifest["verification"]["passed"] is False
    assert manifest["verification"]["failure"] == report.failure


# --- int8 ------------------------------------------------------------------------------------------


def test_int8_graph_is_smaller_and_its_perplexity_delta_is_recorded(exported):
    _, out, report = exported
    assert (out / "model.int8.onnx").stat().st_size < (out / "model.onnx").stat().st_size
    int8 = json.loads((out / "export.json").read_text())["int8"]
    assert int8["file"] == "model.int8.onnx" and int8["weight_scales"] in ("per-tensor", "per-channel")
    ppl = int8["perplexity"]
    assert ppl["eval_tokens"] > 100 and ppl["delta"] == pytest.approx(ppl["int8"] - ppl["fp32"])
    assert abs(ppl["relative_delta"]) < 0.05
    assert set(int8["candidates"]) == {"per-tensor", "per-channel"}
    assert report.paths["int8"] == str(out / "model.int8.onnx")
    logits = OnnxCausalLM(out, "model.int8.onnx")(torch.tensor([[1, 2, 3]]))
    assert logits.shape == (1, 3, 300) and torch.isfinite(logits).all()


# --- the ONNX Runtime model ------------------------------------------------------------------------


def test_load_export_dir_round_trips_to_a_model_that_acts_like_the_torch_one(exported):
    loaded, out, _ = exported
    back = load_export_dir(out)
    model = back.model
    assert isinstance(model, OnnxCausalLM) and back.path == out
    assert back.config == loaded.config and back.provenance["step"] == 20
    assert back.tokenizer.get_vocab() == loaded.tokenizer.get_vocab()
    assert model.context_length == 32 and model.device == torch.device("cpu") and model.eval() is model
    assert model.num_parameters() == loaded.model.num_parameters()
    assert model.graph_path == out / "model.onnx"
    ids = torch.tensor([[9, 8, 7, 6]])
    logits, presents = model(ids, use_cache=True)
    assert len(presents) == 2 and presents[0][0].shape == (1, 2, 4, 16)  # (B, nkv, P+T, hs)
    with torch.no_grad():
        torch.testing.assert_close(logits, loaded.model(ids), rtol=0, atol=1e-5)


def test_load_export_dir_refuses_a_model_dir_and_a_missing_graph(exported, tmp_path):
    loaded, out, _ = exported
    with pytest.raises(LlmctlError, match="not an export dir"):
        load_export_dir(loaded.path)
    with pytest.raises(LlmctlError, match="no such export dir"):
        load_export_dir(tmp_path / "nowhere")
    with pytest.raises(LlmctlError, match="no model.int4.onnx"):
        load_export_dir(out, file="model.int4.onnx")


def test_comparisons_open_onnx_runtime_without_busy_waiting_threads() -> None:
    from llmctl.models.ort_session import session_options

    quiet = session_options(spin_threads=False)
    assert quiet.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert quiet.get_session_config_entry("session.inter_op.allow_spinning") == "0"
    with pytest.raises(RuntimeError, match="does not have configuration"):  # unset: ORT's default, spinning
        session_options().get_session_config_entry("session.intra_op.allow_spinning")
