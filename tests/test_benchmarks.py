"""The benchmark helpers measure what they say (the benchmarks themselves are not run by CI, only smoke-tested)."""

from __future__ import annotations

import torch

from benchmarks import train_step
from benchmarks.common import malloc_name, step_live_peak_bytes, tensor_state_bytes


def test_step_live_peak_counts_the_tensors_alive_together():
    def step() -> None:
        first = torch.ones(2_000_000)  # 8 MB
        second = torch.ones(1_000_000)  # 4 MB, while the first is alive
        del first, second
        third = torch.ones(500_000)  # 2 MB, after both were freed
        del third

    peak = step_live_peak_bytes(step)
    assert 12_000_000 <= peak < 12_100_000


def test_tensor_state_counts_parameters_buffers_and_optimizer_state():
    model = torch.nn.Sequential(torch.nn.Linear(100, 10), torch.nn.BatchNorm1d(10))
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 100)).sum().backward()
    optimizer.step()
    params = sum(p.numel() for p in model.parameters())  # 1010 + 20
    buffers = 2 * 10 * 4 + 8  # running mean / var (float32) + num_batches_tracked (int64)
    steps = 4 * 4  # AdamW's per-parameter step counters (float32 scalars)
    assert tensor_state_bytes(model, optimizer) == 3 * 4 * params + buffers + steps


def test_train_step_benchmark_reports_memory_and_flops():
    record = train_step.main(["--size", "tiny", "--steps", "1", "--warmup", "0", "--threads", "1"])
    assert record["malloc"] == malloc_name() in ("glibc", "tcmalloc", "jemalloc", "mimalloc")
    assert 0 < record["step_live_peak_gb"] < record["peak_memory_gb"]
    assert record["tensor_state_gb"] > 0 and record["flops_per_step"] > 0
