"""micro_batch_size: auto by trying (the GPU path), driven on CPU with the CPU allocator's error."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator

from llmctl.training.autobatch import compatible_micro_batches, probe_micro_batch


def test_compatible_micro_batches_keep_the_global_batch_exact() -> None:
    assert compatible_micro_batches(16, 1) == [16, 8, 4, 2, 1]
    assert compatible_micro_batches(24, 2) == [12, 6, 4, 3, 2, 1]
    for m in compatible_micro_batches(96, 4):
        assert 96 % (m * 4) == 0


def _model_failing_above(limit: int, tried: list[int]) -> torch.nn.Module:
    class Limited(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            tried.append(x.shape[0])
            if x.shape[0] > limit:
                raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 99 bytes")
            return self.lin(x)

    return Limited()


@pytest.mark.parametrize("limit, expected", [(16, 16), (7, 4), (3, 2), (1, 1)])
def test_probe_steps_down_through_compatible_sizes_until_one_runs(limit: int, expected: int) -> None:
    accelerator = Accelerator(cpu=True)
    tried: list[int] = []
    model = accelerator.prepare(_model_failing_above(limit, tried))
    found = probe_micro_batch(
        accelerator, model, lambda m_, m: m_(torch.randn(m, 4)).sum(), compatible_micro_batches(16, 1), reserve_bytes=1024
    )
    assert found == expected
    assert tried == [s for s in [16, 8, 4, 2, 1] if s >= expected]
    assert all(p.grad is None for p in model.parameters())  # the probe leaves no gradients behind
