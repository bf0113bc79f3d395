"""Test-only fault injection and tracing for the real `llmctl` CLI, in every process it starts.

Tests put this folder first on PYTHONPATH, so Python imports it at start-up in the CLI and in
each worker `accelerate launch` starts. It does nothing unless LLMCTL_TEST_FAULT or
LLMCTL_TEST_TRACE is set:

  LLMCTL_TEST_FAULT=oom-above:N        a training forward with more than N rows raises torch.OutOfMemoryError
  LLMCTL_TEST_FAULT=nan-at:K           the K-th training forward returns NaN logits
  LLMCTL_TEST_FAULT=slow-forward:MS    every training forward first sleeps MS milliseconds (a slow trial, cheaply: a test
                                       can kill a run mid-trial without training hundreds of steps)
  LLMCTL_TEST_FAULT=die-before-rename:K  the K-th checkpoint dies (exit 137) after it is written, before its rename
  LLMCTL_TEST_FAULT=write-fails:ERRNO:GLOB[@N]  from the N-th (default 1st) write to a file whose absolute path matches
                                       GLOB (fnmatch) on, the write fails with ERRNO (ENOSPC or EACCES), as a full disk or
                                       a refused permission does: Python's open/os.open/os.mkdir raise OSError(ERRNO);
                                       safetensors' save_file writes a partial file and raises its own SafetensorError
                                       ("... (os error 28)"); torch.save writes a partial file and raises the RuntimeError
                                       of its zip writer, which never names the errno ("unexpected pos ..."). After an
                                       ENOSPC fault os.statvfs reports the disk full, as it would be.
  LLMCTL_TEST_TRACE=DIR                each rank appends to DIR/rank-R.jsonl (rank-parent.jsonl outside workers) the batch rows it reads and the files
                                       it opens for writing (through an audit hook)
"""

import json
import os
import sys
import time

_fault = os.environ.get("LLMCTL_TEST_FAULT", "")
_trace = os.environ.get("LLMCTL_TEST_TRACE", "")


def _install() -> None:
    rank = os.environ.get("RANK", "parent")
    if _trace:
        out_fd = os.open(os.path.join(_trace, f"rank-{rank}.jsonl"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

        def record(obj):
            os.write(out_fd, (json.dumps(obj) + "\n").encode())

        def audit(event, args):
            if event != "open" or not args:
                return
            path, mode, flags = (list(args) + [None, None])[:3]
            writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
            )
            if writes and isinstance(path, (str, bytes, os.PathLike)):
                record({"write": os.path.abspath(os.fsdecode(path))})

        sys.addaudithook(audit)

        from llmctl.training import batches

        original = batches.WindowBatches.micro_batches

        def traced(self, step, rank_, world, micro):
            out = original(self, step, rank_, world, micro)
            per_rank = self.batch_size // world
            starts = self.starts(step)[rank_ * per_rank : (rank_ + 1) * per_rank]
            record({"step": step, "rank": rank_, "world": world, "starts": [int(s) for s in starts]})
            return out

        batches.WindowBatches.micro_batches = traced

    if not _fault:
        return
    kind, _, arg = _fault.partition(":")
    if kind == "write-fails":
        _install_write_failures(arg)
        return
    n = int(arg)
    if kind in {"oom-above", "nan-at", "slow-forward"}:
        import torch

        from llmctl.models import gpt

        forward = gpt.GPT.forward
        calls = [0]

        def faulty(self, input_ids, *args, **kwargs):
            if self.training:
                calls[0] += 1
                if kind == "slow-forward":
                    time.sleep(n / 1000)
                if kind == "oom-above" and input_ids.shape[0] > n:
                    raise torch.OutOfMemoryError(f"injected: {input_ids.shape[0]} rows > {n}")
                if kind == "nan-at" and calls[0] == n:
                    return forward(self, input_ids, *args, **kwargs) * float("nan")
            return forward(self, input_ids, *args, **kwargs)

        gpt.GPT.forward = faulty
    elif kind == "die-before-rename":
        from llmctl.training import checkpoints

        replace = checkpoints.replace_dir_atomic
        calls = [0]

        def dying(tmp, final):
            calls[0] += 1
            if calls[0] == n:
                os._exit(137)
            return replace(tmp, final)

        checkpoints.replace_dir_atomic = dying
    else:
        raise SystemExit(f"LLMCTL_TEST_FAULT: unknown fault {_fault!r}")


def _install_write_failures(spec: str) -> None:
    import errno
    import fnmatch

    name, _, rest = spec.partition(":")
    pattern, _, nth = rest.partition("@")
    code = getattr(errno, name)
    first = int(nth or 1)
    seen = [0]
    writing_partial = [False]

    def due(path) -> bool:
        if writing_partial[0] or not isinstance(path, (str, bytes, os.PathLike)):
            return False
        if not fnmatch.fnmatch(os.path.abspath(os.fsdecode(path)), pattern):
            return False
        seen[0] += 1
        if seen[0] >= first and code == errno.ENOSPC:
            _fill_disk()
        return seen[0] >= first

    def partial(path) -> None:
        writing_partial[0] = True
        try:
            with open(os.fsdecode(path), "wb") as f:  # the bytes a writer got out before the disk was full
                f.write(b"\0" * 1024)
        finally:
            writing_partial[0] = False

    def audit(event, args):
        if event == "open" and args:
            path, mode, flags = (list(args) + [None, None])[:3]
            writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
            )
            if writes and due(path):
                raise OSError(code, os.strerror(code), os.fsdecode(path))
        elif event == "os.mkdir" and args and due(args[0]):
            raise OSError(code, os.strerror(code), os.fsdecode(args[0]))

    import safetensors.torch
    import torch
    from safetensors import SafetensorError

    save_file, save = safetensors.torch.save_file, torch.save

    def failing_save_file(tensors, filename, *args, **kwargs):
        if due(filename):
            partial(filename)
            raise SafetensorError(f"Error while serializing: I/O error: {os.strerror(code)} (os error {code})")
        return save_file(tensors, filename, *args, **kwargs)

    def failing_save(obj, f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)) and due(f):
            partial(f)
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 5120 vs 5012")
        return save(obj, f, *args, **kwargs)

    _replace_everywhere(save_file, failing_save_file)
    _replace_everywhere(save, failing_save)
    sys.addaudithook(audit)


def _replace_everywhere(original, replacement) -> None:
    """Point every loaded module's global that is `original` at `replacement`: modules imported before this
    one ran (`from safetensors.torch import save_file` in accelerate, when the test harness preloads it) keep
    their own binding, which patching the defining module alone would miss."""
    for module in list(sys.modules.values()):
        namespace = getattr(module, "__dict__", None)
        if not isinstance(namespace, dict):
            continue
        for name, value in list(namespace.items()):
            if value is original:
                namespace[name] = replacement


def _fill_disk() -> None:
    """From now on os.statvfs (and so shutil.disk_usage) says no block is free."""
    real = os.statvfs
    if getattr(real, "full", False):
        return

    def full(path):
        st = real(path)
        return os.statvfs_result((st.f_bsize, st.f_frsize, st.f_blocks, 0, 0, st.f_files, st.f_ffree, st.f_favail,
                                  st.f_flag, st.f_namemax))

    full.full = True
    os.statvfs = full


if _fault or _trace:
    _install()
