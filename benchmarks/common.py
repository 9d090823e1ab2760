"""Shared pieces of the benchmarks: model sizes, random inputs and peak memory (the matmul peak for MFU is
engine.throughput.measured_matmul_flops, which training runs use too)."""

from __future__ import annotations

import json
import resource
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]

SIZES: dict[str, dict[str, Any]] = {
    # ALBEF's published architecture: ViT-B/16 at 256 px, BERT-base with fusion from layer 6, embed 256.
    "base": {"bert_config": str(REPO / "configs" / "config_bert.json"), "bert_overrides": {}, "image_res": 256,
             "embed_dim": 256, "queue_size": 65536,
             "vit": {"patch_size": 16, "width": 768, "depth": 12, "heads": 12}},
    # The demo's model.
    "tiny": {"bert_config": str(REPO / "configs" / "config_bert.json"),
             "bert_overrides": {"hidden_size": 64, "num_hidden_layers": 4, "fusion_layer": 2,
                                "num_attention_heads": 2, "intermediate_size": 128, "encoder_width": 64,
                                "max_position_embeddings": 64, "vocab_size": 1000},
             "image_res": 48, "embed_dim": 64, "queue_size": 512,
             "vit": {"patch_size": 8, "width": 64, "depth": 2, "heads": 2}},
}


def model_cfg(size: str, **changes: Any) -> dict[str, Any]:
    if size not in SIZES:
        raise ValueError(f"--size must be one of {sorted(SIZES)}, got {size!r}")
    return {**SIZES[size], "text_encoder": "", "tokenizer": "", **changes}


def random_text(batch: int, length: int, vocab: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(1000 if vocab > 2000 else 5, vocab, (batch, length), generator=generator)
    ids[:, 0] = 101 if vocab > 2000 else 2  # [CLS]
    mask = torch.ones(batch, length, dtype=torch.long)
    return ids, mask


def peak_memory_bytes(device: torch.device) -> int:
    """Peak RSS of this process on CPU, max allocated on GPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def malloc_name() -> str:
    """The C allocator serving this process: a preloaded tcmalloc / jemalloc / mimalloc, else glibc's."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "unknown"
    for name in ("tcmalloc", "jemalloc", "mimalloc"):
        if f"lib{name}" in maps:
            return name
    return "glibc"


def tensor_state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the parameters, buffers and optimizer state (what stays allocated between steps)."""
    tensors = {t.data_ptr(): t for t in [*model.parameters(), *model.buffers()]}
    for state in optimizer.state.values():
        tensors.update({t.data_ptr(): t for t in state.values() if torch.is_tensor(t)})
    return sum(t.numel() * t.element_size() for t in tensors.values())


def step_live_peak_bytes(step: Callable[[], None]) -> int:
    """Peak of the bytes of tensors allocated during one call of ``step`` and still alive, above what was allocated
    when it began, from the profiler's allocation events (CPU). Unlike RSS, this does not depend on the C
    allocator's caching and fragmentation: it is what an ideal allocator would need, as GPU max_allocated is."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def emit(record: dict[str, Any]) -> None:
    print(json.dumps(record), flush=True)


def child_pids(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (Linux /proc; e.g. a DataLoader's workers)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2 :].split()[1]) == pid:
                found.append(int(entry.name))
    return found
