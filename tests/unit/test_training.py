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
from llmctl.training.run_checks import check_run_dir

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


@pytest.mark.parametrize("name", ["adamw", "adam"])
def test_adam_and_adamw_use_the_fused_kernel_and_step_as_the_per_tensor_loop_does(tiny_gpt, name):
    model, twin = tiny_gpt(), tiny_gpt()
    fused = build_optimizer(model, cfg(optimizer=name, lr=1e-2, weight_decay=0.1))
    assert all(g["fused"] for g in fused.param_groups)
    loop = type(fused)(parameter_groups(twin, 0.1), lr=1e-2, betas=fused.defaults["betas"], eps=fused.defaults["eps"],
                       foreach=False)
    ids = torch.randint(0, 300, (2, 16))
    for _ in range(3):
        for m, opt in ((model, fused), (twin, loop)):
            m.train()
            m(ids).float().logsumexp(-1).mean().backward()
            opt.step()
            opt.zero_grad()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # rounding apart, the same update


def test_a_frozen_or_integer_parameter_set_keeps_the_fused_kernel_off():
    from llmctl.training.optim import fused_kernel_applies

    assert fused_kernel_applies([{"params": [torch.nn.Parameter(torch.zeros(2))]}])
    assert not fused_kernel_applies([{"params": []}])
    assert not fused_kernel_applies([{"params": [torch.nn.Parameter(torch.zeros(2, dtype=torch.int64), requires_grad=False)]}])


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


def test_a_run_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(LlmctlError, match=r"--run-dir .*notes\.txt: is an existing file") as info:
        check_run_dir(tmp_path / "notes.txt", resume=False, overwrite=False)
    assert info.value.exit_code == 2


def _recipe(tmp_path: Path, **data) -> "Recipe":
    from llmctl.config.schema import Recipe

    (tmp_path / "corpus").mkdir(exist_ok=True)
    return Recipe.model_validate({"run": {"name": "r"}, "data": {"sources": [str(tmp_path / "corpus")],
                                                                 "dir": str(tmp_path / "data/r"), **data}})


@pytest.mark.parametrize("run, problem", [
    ("data/r", r"--run-dir .*data/r: the same path as the dataset dir \(.*data/r\), which this command reads"),
    ("data/r/run", r"--run-dir .*data/r/run: inside the dataset dir \(.*data/r\)"),
    ("corpus/run", r"--run-dir .*corpus/run: inside data\.sources\[0\]"),
])
def test_a_run_dir_over_an_input_is_refused(tmp_path, run, problem):
    with pytest.raises(LlmctlError, match=problem):
        check_run_dir(tmp_path / run, resume=False, overwrite=False, recipe=_recipe(tmp_path))


def test_an_input_inside_the_files_a_run_replaces_is_refused(tmp_path):
    from llmctl.config.schema import Recipe

    recipe = _recipe(tmp_path)
    model = tmp_path / "runs/r/model"
    model.mkdir(parents=True)
    recipe = Recipe.model_validate({**recipe.model_dump(), "model": {"init_from": str(model)}})
    with pytest.raises(LlmctlError, match=r"model\.init_from .*runs/r/model: inside the run dir's model"):
        check_run_dir(tmp_path / "runs/r", resume=False, overwrite=True, recipe=recipe)
    assert check_run_dir(tmp_path / "runs/other", resume=False, overwrite=False, recipe=recipe) is None


def test_stale_temporaries_are_what_an_interrupted_run_leaves(tmp_path):
    rd = RunDir(tmp_path / "run")
    make_checkpoint(rd.path, 5)
    stale = [rd.path / ".model.k2j4h_x1.tmp", rd.path / ".model.old", rd.checkpoints / ".step-10.tmp",
             rd.checkpoints / ".best.a1b2c3d4.tmp", rd.path / ".metrics.jsonl.abc.tmp"]
    for path in stale:
        path.mkdir() if not path.name.startswith(".metrics") else path.write_text("{")
    (rd.path / "model").mkdir()
    assert rd.stale_temporaries() == sorted(stale)


# --- evaluation scaled to the run, and the batch split ---------------------------------------------------


@pytest.mark.parametrize("settings, max_steps, per_epoch, every, note", [
    ({"eval_every": 150, "epochs": 10}, 75, 8, 8, "once an epoch"),  # the README's own-CSV case
    ({"eval_every": 150}, 75, None, 15, "5 evaluations"),
    ({"eval_every": 150, "epochs": 1}, 75, 75, 15, "5 evaluations"),
    ({"eval_every": 75}, 75, None, 75, None),  # one evaluation at the end, chosen
    ({"eval_every": 20}, 75, None, 20, None),
    ({"eval_every": 150}, 1, None, 150, None),
])
def test_an_eval_interval_beyond_the_run_is_scaled_to_it_and_says_so(settings, max_steps, per_epoch, every, note):
    from llmctl.training.steps import scaled_eval_every

    got, message = scaled_eval_every(TrainConfig(**settings), max_steps, per_epoch)
    assert got == every
    if note is None:
        assert message is None
    else:
        assert f"train.eval_every ({settings['eval_every']}) is beyond this run's {max_steps} steps" in message
        assert f"evaluating every {every} steps ({note})" in message


def test_a_batch_the_processes_cannot_split_is_refused_naming_the_sizes():
    from llmctl.training.run_checks import check_batch_split

    check_batch_split(TrainConfig(batch_size=16, micro_batch_size=8), 2)
    with pytest.raises(LlmctlError, match=r"train\.batch_size \(24\) must be a multiple of micro_batch_size x "
                                          r"processes \(8 x 2\); choose a train\.micro_batch_size that divides 12"):
        check_batch_split(TrainConfig(batch_size=24, micro_batch_size=8), 2)
    with pytest.raises(LlmctlError, match=r"train\.batch_size \(16\) must be a multiple of the process count \(3\)"):
        check_batch_split(TrainConfig(batch_size=16, micro_batch_size=8), 3)


# --- a write that fails: a full disk or a refused permission is one line, and nothing partial stays -------


def test_a_full_disk_is_named_with_the_write_the_path_and_the_free_space(tmp_path):
    import errno

    from llmctl.artifacts import write_failure

    failure = write_failure(OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x" / "optimizer.bin")),
                            f"the checkpoint {tmp_path / 'x'}", tmp_path / "x")
    assert failure.message.startswith(f"cannot write the checkpoint {tmp_path / 'x'} (optimizer.bin): no space left on device; ")
    assert " free there." in failure.message
    assert (failure.kind, failure.exit_code) == ("disk_full", 1)


@pytest.mark.parametrize("error", [
    RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"),  # safetensors
    Exception("No space left on device (os error 28)"),  # tokenizers' save
    OSError("[Errno 28] No space left on device: 'a' -> 'b'"),  # shutil.Error
])
def test_a_full_disk_is_recognised_in_the_messages_of_writers_that_hide_the_errno(tmp_path, error):
    from llmctl.artifacts import write_failure

    assert write_failure(error, "the model dir", tmp_path).kind == "disk_full"


def test_torchs_zip_writer_error_is_a_full_disk_only_when_the_disk_is_nearly_full(tmp_path, monkeypatch):
    import shutil

    from llmctl.artifacts import write_failure

    error = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 5120 vs 5012")
    assert write_failure(error, "the checkpoint", tmp_path) is None  # this disk has room: some other failure
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(1 << 30, 1 << 30, 4096))
    failure = write_failure(error, "the checkpoint", tmp_path)
    assert "no space left on device; 4.00 KiB free there" in failure.message


def test_a_refused_permission_is_one_line_and_other_errors_are_left_alone(tmp_path):
    import errno

    from llmctl.artifacts import write_failure

    failure = write_failure(PermissionError(errno.EACCES, "Permission denied"), "the run dir runs/x", tmp_path)
    assert failure.message.startswith("cannot write the run dir runs/x: permission denied. Make it writable")
    assert failure.kind == "not_writable"
    assert write_failure(ValueError("a bug"), "the run dir", tmp_path) is None
    assert write_failure(OSError(errno.EIO, "I/O error"), "the run dir", tmp_path) is None


def test_writing_removes_the_partial_file_and_reraises_an_ordinary_error(tmp_path):
    import errno

    from llmctl.artifacts import WriteFailed, writing

    partial = tmp_path / ".step-3.tmp"
    partial.mkdir()
    with pytest.raises(ValueError):
        with writing("the checkpoint", tmp_path / "step-3", partial=partial):
            raise ValueError("a bug")
    assert not partial.exists()
    partial.mkdir()
    with pytest.raises(WriteFailed, match="no space left on device"):
        with writing("the checkpoint", tmp_path / "step-3", partial=partial):
            raise OSError(errno.ENOSPC, "No space left on device")
    assert not partial.exists()


def test_a_failed_staged_dir_leaves_the_earlier_dir_and_no_staging_dir(tmp_path):
    import errno

    from llmctl.artifacts import WriteFailed, staged_dir

    final = tmp_path / "model"
    final.mkdir()
    (final / "config.json").write_text("old")
    with pytest.raises(WriteFailed) as info:
        with staged_dir(final, f"the model dir {final}") as stage:
            (stage / "config.json").write_text("new")
            raise OSError(errno.ENOSPC, "No space left on device", str(stage / "model.safetensors"))
    assert f"The earlier {final} is unchanged." in info.value.message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert (final / "config.json").read_text() == "old"


def test_a_metrics_row_that_hits_a_full_disk_is_cut_back_off(tmp_path, monkeypatch):
    import errno
    import os

    from llmctl.artifacts import WriteFailed

    log = MetricsLog(tmp_path / "metrics.jsonl", enabled=True)
    log.append({"step": 1, "loss": 1.0})
    before = log.path.read_bytes()
    real_write = os.write

    def half_then_full(fd, data):
        real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(WriteFailed, match=r"cannot write the metrics log .*metrics\.jsonl: no space left on device"):
        log.append({"step": 2, "loss": 0.5})
    monkeypatch.setattr(os, "write", real_write)
    assert log.path.read_bytes() == before


def test_model_safetensors_gets_the_same_mode_as_the_other_files(tiny_gpt, tiny_tokenizer_path, tmp_path):
    from llmctl.models.model_dir import save_model_dir

    save_model_dir(tiny_gpt(), tmp_path / "model", tokenizer_path=tiny_tokenizer_path, provenance={})
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "model").iterdir()}
    assert len(set(modes.values())) == 1, modes
