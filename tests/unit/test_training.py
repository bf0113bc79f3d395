"""Training pieces: lr schedules, optimizers, L1, step-addressed batches, eval windows, metrics, run dir rules."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from llmctl.artifacts import RunDir, write_json_atomic
from llmctl.config.schema import TrainConfig
from llmctl.errors import LlmctlError
from llmctl.training.batches import WindowBatches, eval_starts
from llmctl.training.checkpoints import REQUIRED, STATE_FILE, MetricsLog, check_checkpoint
from llmctl.training.optim import build_optimizer, build_schedule, l1_penalty, lr_multiplier, parameter_groups
from llmctl.training.trainer import check_run_dir

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --- learning-rate schedules -------------------------------------------------------------------------


def cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"max_steps": 100, "warmup_steps": 10, "min_lr_ratio": 0.1, **kw})


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_warmup_rises_linearly_to_the_peak_at_its_last_step(schedule):
    c = cfg(schedule=schedule)
    assert lr_multiplier(0, c) == pytest.approx(0.1)  # (0 + 1) / 10
    assert lr_multiplier(4, c) == pytest.approx(0.5)
    assert lr_multiplier(9, c) == pytest.approx(1.0)  # the end of warmup is the peak
    assert lr_multiplier(10, c) == pytest.approx(1.0)  # the schedule starts from the peak


def test_constant_schedule_stays_at_the_peak_to_the_end():
    c = cfg(schedule="constant")
    assert [lr_multiplier(s, c) for s in (10, 50, 99, 100)] == [1.0, 1.0, 1.0, 1.0]


def test_linear_schedule_falls_in_a_straight_line_to_min_lr_ratio():
    c = cfg(schedule="linear")
    assert lr_multiplier(40, c) == pytest.approx(0.1 + 0.9 * (2 / 3))  # a third of the way through 90 steps
    assert lr_multiplier(55, c) == pytest.approx(0.55)
    assert lr_multiplier(100, c) == pytest.approx(0.1)


def test_cosine_schedule_follows_half_a_cosine_to_min_lr_ratio():
    c = cfg(schedule="cosine")
    assert lr_multiplier(40, c) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 3)))  # 0.775
    assert lr_multiplier(55, c) == pytest.approx(0.55)
    assert lr_multiplier(100, c) == pytest.approx(0.1)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_schedule_past_max_steps_stays_at_the_floor(schedule):
    assert lr_multiplier(500, cfg(schedule=schedule)) == pytest.approx(0.1)


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_without_warmup_step_0_is_the_peak(schedule):
    assert lr_multiplier(0, cfg(schedule=schedule, warmup_steps=0)) == pytest.approx(1.0)


def test_schedule_never_rises_after_warmup():
    c = cfg(schedule="cosine", min_lr_ratio=0.0)
    values = [lr_multiplier(s, c) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert values[-1] == pytest.approx(0.0)


def test_build_schedule_scales_the_optimizer_lr_by_the_multiplier():
    c = cfg(lr=0.5, schedule="linear")
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2, 2))], lr=c.lr)
    sched = build_schedule(opt, c)
    seen = []
    for _ in range(12):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([0.5 * lr_multiplier(s, c) for s in range(12)])


# --- optimizers --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, cls", [("adamw", torch.optim.AdamW), ("adam", torch.optim.Adam), ("sgd", torch.optim.SGD),
                  ("rmsprop", torch.optim.RMSprop)],
)
def test_build_optimizer_returns_the_named_class_with_the_recipe_lr(tiny_gpt, name, cls):
    opt = build_optimizer(tiny_gpt(), cfg(optimizer=name, lr=0.03, weight_decay=0.2))
    assert type(opt) is cls
    assert all(g["lr"] == 0.03 for g in opt.param_groups)


def test_adam_gets_the_recipe_betas_and_eps(tiny_gpt):
    opt = build_optimizer(tiny_gpt(), cfg(optimizer="adamw", betas=(0.8, 0.9), eps=1e-6))
    assert opt.param_groups[0]["betas"] == (0.8, 0.9) and opt.param_groups[0]["eps"] == 1e-6


def test_sgd_nesterov_needs_momentum(tiny_gpt):
    assert build_optimizer(tiny_gpt(), cfg(optimizer="sgd", nesterov=True, momentum=0.9)).param_groups[0]["nesterov"]
    no_momentum = build_optimizer(tiny_gpt(), cfg(optimizer="sgd", nesterov=True, momentum=0.0))
    assert not no_momentum.param_groups[0]["nesterov"]


@pytest.mark.parametrize("name", ["adamw", "adam", "sgd", "rmsprop"])
def test_vectors_are_not_decayed_and_every_parameter_is_in_one_group(tiny_gpt, name):
    model = tiny_gpt(tie_embeddings=True)
    opt = build_optimizer(model, cfg(optimizer=name, weight_decay=0.25))
    decayed, undecayed = opt.param_groups
    assert decayed["weight_decay"] == 0.25 and undecayed["weight_decay"] == 0.0
    assert decayed["params"] and all(p.dim() >= 2 for p in decayed["params"])
    assert undecayed["params"] and all(p.dim() == 1 for p in undecayed["params"])
    norms = {id(m.weight) for name_, m in model.named_modules() if name_.endswith("norm")}
    assert norms == {id(p) for p in undecayed["params"]}
    grouped = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(grouped) == len(set(grouped)) == len(list(model.parameters()))  # the tied weight once


def test_frozen_parameters_are_left_out():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 3))
    model[0].weight.requires_grad_(False)
    groups = parameter_groups(model, 0.1)
    ids = {id(p) for g in groups for p in g["params"]}
    assert id(model[0].weight) not in ids and id(model[1].weight) in ids


def test_l1_penalty_sums_absolute_matrix_weights_only():
    lin = torch.nn.Linear(2, 2, bias=True)
    norm = torch.nn.LayerNorm(2)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, -2.0], [0.5, -0.25]]))
        lin.bias.fill_(100.0)
        norm.weight.fill_(-7.0)
    assert float(l1_penalty(torch.nn.Sequential(lin, norm)).detach()) == pytest.approx(3.75)


def test_l1_penalty_counts_a_shared_matrix_once_and_has_a_gradient():
    emb = torch.nn.Embedding(3, 2)
    head = torch.nn.Linear(2, 3, bias=False)
    head.weight = emb.weight
    with torch.no_grad():
        emb.weight.fill_(-1.0)
    penalty = l1_penalty(torch.nn.ModuleList([emb, head]))
    assert float(penalty.detach()) == pytest.approx(6.0)
    penalty.backward()
    assert torch.equal(emb.weight.grad, torch.full((3, 2), -1.0))


def test_l1_penalty_of_a_module_without_matrices_is_zero():
    assert float(l1_penalty(torch.nn.LayerNorm(4))) == 0.0


# --- step-addressed batches --------------------------------------------------------------------------


def test_same_seed_and_step_give_the_same_starts():
    tokens = np.arange(10_000, dtype=np.uint16)
    a = WindowBatches(tokens, 32, 8, seed=3)
    b = WindowBatches(tokens, 32, 8, seed=3)
    assert np.array_equal(a.starts(17), b.starts(17))
    assert len(a.starts(17)) == 8


def test_different_steps_and_seeds_give_different_starts():
    tokens = np.arange(10_000, dtype=np.uint16)
    batches = WindowBatches(tokens, 32, 8, seed=3)
    assert not np.array_equal(batches.starts(0), batches.starts(1))
    assert not np.array_equal(batches.starts(0), WindowBatches(tokens, 32, 8, seed=4).starts(0))


def test_starts_keep_every_window_and_its_target_inside_the_tokens():
    tokens = np.arange(100, dtype=np.uint16)
    batches = WindowBatches(tokens, 32, 64, seed=0)
    starts = np.concatenate([batches.starts(s) for s in range(20)])
    assert starts.min() >= 0 and starts.max() <= 100 - 32 - 1
    assert starts.max() == 100 - 32 - 1  # the last window is reachable
    exact = WindowBatches(np.arange(33, dtype=np.uint16), 32, 4, seed=0)
    assert exact.starts(0).tolist() == [0, 0, 0, 0]  # only one window fits


def test_rows_give_int64_inputs_and_targets_shifted_by_one():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 300, size=500).astype(np.uint16)
    batches = WindowBatches(tokens, 16, 4, seed=0)
    starts = np.array([0, 7, 100, 483])
    x, y = batches.rows(starts)
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    for row, s in enumerate(starts):
        assert x[row].tolist() == tokens[s : s + 16].tolist()
        assert y[row].tolist() == tokens[s + 1 : s + 17].tolist()


def test_two_ranks_split_the_global_batch_without_overlap():
    tokens = np.arange(50_000, dtype=np.uint32)  # a row's first token is its start
    batches = WindowBatches(tokens, 16, 8, seed=1)
    step = 5
    global_x, global_y = batches.rows(batches.starts(step))
    per_rank = []
    for rank in (0, 1):
        micro = batches.micro_batches(step, rank=rank, world=2, micro_batch_size=2)
        assert len(micro) == 2 and all(x.shape == (2, 16) for x, _ in micro)
        per_rank.append((torch.cat([x for x, _ in micro]), torch.cat([y for _, y in micro])))
    (x0, y0), (x1, y1) = per_rank
    assert torch.equal(torch.cat([x0, x1]), global_x) and torch.equal(torch.cat([y0, y1]), global_y)
    rows0 = {tuple(r) for r in x0.tolist()}
    rows1 = {tuple(r) for r in x1.tolist()}
    all_rows = {tuple(r) for r in global_x.tolist()}
    assert rows0 | rows1 == all_rows and not rows0 & rows1  # distinct with 8 of 50k starts


def test_one_process_with_accumulation_sees_the_global_batch_in_micro_batches():
    tokens = np.arange(5_000, dtype=np.uint16)
    batches = WindowBatches(tokens, 8, 8, seed=0)
    micro = batches.micro_batches(2, rank=0, world=1, micro_batch_size=4)
    assert len(micro) == 2
    assert torch.equal(torch.cat([x for x, _ in micro]), batches.rows(batches.starts(2))[0])


# --- eval windows ------------------------------------------------------------------------------------


def test_eval_starts_are_empty_when_no_window_fits():
    assert eval_starts(32, 32, 10).size == 0  # needs context_length + 1 tokens
    assert eval_starts(0, 32, 10).size == 0
    assert eval_starts(33, 32, 10).tolist() == [0]


def test_eval_starts_cover_a_short_split_with_non_overlapping_windows():
    starts = eval_starts(200, 32, 100)
    assert starts.tolist() == [0, 32, 64, 96, 128, 160]  # every whole window, none overlapping
    assert starts[-1] + 32 + 1 <= 200


def test_eval_starts_spread_count_windows_evenly_over_a_long_split():
    starts = eval_starts(100_000, 32, 5)
    assert len(starts) == 5 and starts[0] == 0 and starts[-1] == 100_000 - 33
    gaps = np.diff(starts)
    assert gaps.min() >= 32 and gaps.max() - gaps.min() <= 1
    assert np.array_equal(starts, eval_starts(100_000, 32, 5))  # the same windows at every evaluation


# --- metrics log -------------------------------------------------------------------------------------


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_truncate_after_keeps_rows_up_to_the_step_and_drops_a_torn_line(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl", enabled=True)
    for step in (5, 10, 15, 20):
        log.append({"step": step, "loss": 1.0 / step})
    log.append({"step": 10, "val_loss": 2.0})
    with open(log.path, "a") as f:
        f.write('{"step": 25, "lo')  # a crash mid-write
    log.truncate_after(15)
    assert [(r["step"], "val_loss" in r) for r in read_rows(log.path)] == [
        (5, False), (10, False), (15, False), (10, True)
    ]


def test_truncate_after_on_a_missing_log_leaves_an_empty_one(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl", enabled=True)
    log.truncate_after(3)
    assert log.path.read_text() == ""


def test_disabled_metrics_log_writes_and_truncates_nothing(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 9}\n')
    log = MetricsLog(path, enabled=False)
    log.append({"step": 10})
    log.truncate_after(1)
    assert path.read_text() == '{"step": 9}\n'


# --- checkpoints and run dir rules -------------------------------------------------------------------


def make_checkpoint(run_dir: Path, step: int) -> Path:
    path = RunDir(run_dir).checkpoint(step)
    path.mkdir(parents=True)
    write_json_atomic(path / STATE_FILE, {"step": step, "tokens": step * 256})
    for name in REQUIRED:
        if name != STATE_FILE:
            (path / name).write_bytes(b"x")
    return path


def test_check_checkpoint_returns_the_trainer_state(tmp_path):
    state = check_checkpoint(make_checkpoint(tmp_path / "run", 40))
    assert state["step"] == 40 and state["tokens"] == 40 * 256


@pytest.mark.parametrize("missing", REQUIRED)
def test_check_checkpoint_refuses_a_dir_missing_a_file_naming_the_dir(tmp_path, missing):
    path = make_checkpoint(tmp_path / "run", 40)
    (path / missing).unlink()
    with pytest.raises(LlmctlError) as info:
        check_checkpoint(path)
    assert info.value.message.startswith(f"{path}: not a checkpoint (missing {missing})")


def test_check_checkpoint_refuses_a_missing_dir(tmp_path):
    with pytest.raises(LlmctlError, match=r"step-9: no such checkpoint dir"):
        check_checkpoint(tmp_path / "step-9")


def test_check_checkpoint_refuses_a_state_without_a_step(tmp_path):
    path = make_checkpoint(tmp_path / "run", 40)
    write_json_atomic(path / STATE_FILE, {"tokens": 1})
    with pytest.raises(LlmctlError, match=r"trainer_state\.json: has no integer 'step'"):
        check_checkpoint(path)


def test_fresh_run_dir_needs_no_flag(tmp_path):
    assert check_run_dir(tmp_path / "runs" / "new", resume=False, overwrite=False) is None
    (tmp_path / "runs" / "metrics-only").mkdir(parents=True)
    assert check_run_dir(tmp_path / "runs" / "metrics-only", resume=False, overwrite=False) is None


def test_existing_checkpoints_without_resume_or_overwrite_are_refused(tmp_path):
    run = tmp_path / "run"
    make_checkpoint(run, 20)
    with pytest.raises(LlmctlError) as info:
        check_run_dir(run, resume=False, overwrite=False)
    message = info.value.message
    assert message.startswith(f"{run} already has checkpoints (newest step-20)")
    assert "--resume" in message and "--overwrite" in message


def test_overwrite_accepts_existing_checkpoints(tmp_path):
    run = tmp_path / "run"
    make_checkpoint(run, 20)
    assert check_run_dir(run, resume=False, overwrite=True) is None


def test_resume_without_checkpoints_is_refused(tmp_path):
    (tmp_path / "run").mkdir()
    with pytest.raises(LlmctlError, match="no checkpoint to resume from; run without --resume"):
        check_run_dir(tmp_path / "run", resume=True, overwrite=False)


def test_resume_picks_the_newest_checkpoint_by_step_number_not_by_name(tmp_path):
    run = tmp_path / "run"
    make_checkpoint(run, 5)
    newest = make_checkpoint(run, 20)
    (run / "checkpoints" / ".step-30.tmp").mkdir()  # half-written: ignored
    assert check_run_dir(run, resume=True, overwrite=False) == (20, newest)


def test_resume_from_a_damaged_newest_checkpoint_is_refused(tmp_path):
    run = tmp_path / "run"
    make_checkpoint(run, 5)
    (make_checkpoint(run, 20) / "optimizer.bin").unlink()
    with pytest.raises(LlmctlError, match=r"step-20: not a checkpoint \(missing optimizer\.bin\)"):
        check_run_dir(run, resume=True, overwrite=False)


def test_resume_and_overwrite_together_are_refused(tmp_path):
    with pytest.raises(LlmctlError, match="--resume and --overwrite contradict each other") as info:
        check_run_dir(tmp_path / "run", resume=True, overwrite=True)
    assert info.value.kind == "usage"
