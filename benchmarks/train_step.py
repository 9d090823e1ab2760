"""Seconds per optimizer step of a task model, with samples/s, peak memory, FLOPs per step and MFU (one JSON line).

    python benchmarks/train_step.py --task pretrain --size base --batch 4 --threads 2
    python benchmarks/train_step.py --task pretrain --size base --batch 64 --amp bf16 --device cuda [--compile]

The step is the engine's: forward (named losses) -> sum -> backward -> clip -> AdamW step (fused on CUDA and
CPU, the factory's default). FLOPs come from torch's FlopCounterMode over one step; MFU divides the achieved FLOP/s
by a matmul peak measured in the same run on the same device and dtype.

Memory fields: ``peak_memory_gb`` is the process's peak RSS on CPU (what the machine must have; it includes the
libraries and whatever the C allocator keeps cached or fragmented, so it depends on ``malloc``, the allocator found
in the process) and max allocated on GPU. ``tensor_state_gb`` is parameters + buffers + optimizer state, and
``step_live_peak_gb`` (CPU) the peak of the tensors a step allocates on top of it, from the profiler's allocation
events: together they are what an ideal allocator would need, comparable with GPU max allocated.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # the profiler (live-memory step) would log GPU probing errors

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    emit,
    malloc_name,
    median,
    model_cfg,
    peak_memory_bytes,
    random_text,
    step_live_peak_bytes,
    sync,
    tensor_state_bytes,
)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="pretrain", choices=["pretrain", "retrieval"])
    parser.add_argument("--size", default="tiny", choices=["tiny", "base"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--text-len", type=int, default=30)
    parser.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"])
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend (aot_eager: no codegen)")
    parser.add_argument("--grad-ckpt", action="store_true")
    parser.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0 = torch's default)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--steps", type=int, default=5, help="timed steps (after --warmup)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--profile", action="store_true",
                        help="CUDA: also profile 3 steps: kernel launches per step, the share of the step the GPU is "
                             "busy, and the kernels taking the most time")
    parser.add_argument("--fused", default="auto", choices=["auto", "true", "false"],
                        help="AdamW implementation (optimizer.fused): auto = the factory's choice")
    args = parser.parse_args(argv)

    import optim
    from engine.backend import compile_model
    from models import create_model
    from models.albef import SpecialTokens

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = model_cfg(args.size, grad_checkpointing=args.grad_ckpt)
    vocab = 30522 if args.size == "base" else 1000
    special = SpecialTokens() if args.size == "base" else SpecialTokens(pad=0, cls=2, sep=3, mask=4, vocab_size=vocab)
    torch.manual_seed(0)
    model = create_model(args.task, cfg, special=special).to(device).train()
    fused = {"auto": None, "true": True, "false": False}[args.fused]
    optimizer = optim.create_optimizer({"lr": 1e-4, "weight_decay": 0.02, "fused": fused}, model)
    amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    step_model = compile_model(model, args.compile_backend, "default") if args.compile else model  # as train.compile

    gen = torch.Generator().manual_seed(0)
    image = torch.randn(args.batch, 3, cfg["image_res"], cfg["image_res"], generator=gen).to(device)
    ids, mask = (t.to(device) for t in random_text(args.batch, args.text_len, vocab, gen))
    extra = {"idx": torch.arange(args.batch, device=device)} if args.task == "retrieval" else {}

    def step() -> None:
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            losses = step_model(image, ids, mask, alpha=0.4, **extra)
            total = sum(losses.values())
        if scaler is not None:
            scaler.scale(total).backward()
            scaler.unscale_(optimizer)
        else:
            total.backward()
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], 5.0)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    sync(device)
    warmup_start = time.perf_counter()
    for _ in range(args.warmup):
        step()
    sync(device)
    warmup_s = time.perf_counter() - warmup_start  # with --compile: the compilation
    times = []
    for _ in range(args.steps):
        sync(device)
        start = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - start)

    peak_bytes = peak_memory_bytes(device)  # before the FLOP-counting step, which keeps records of its own
    live_peak = step_live_peak_bytes(step) if device.type == "cpu" else None

    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    flops = counter.get_total_flops()
    seconds = median(times)
    from engine.throughput import device_peak_flops, measured_matmul_flops

    peak = measured_matmul_flops(device, amp_dtype or torch.float32, size=8192 if device.type == "cuda" else 2048,
                                 repeats=5)

    datasheet, datasheet_source = device_peak_flops(device, amp_dtype) if device.type == "cuda" else (None, None)
    record = {
        "benchmark": "train_step", "task": args.task, "size": args.size, "batch": args.batch, "amp": args.amp,
        "compile": args.compile, "grad_ckpt": args.grad_ckpt, "fused_adamw": args.fused, "device": str(device),
        "threads": torch.get_num_threads(), "median_step_s": round(seconds, 4),
        "samples_per_s": round(args.batch / seconds, 3), "peak_memory_gb": round(peak_bytes / 1e9, 3),
        "tensor_state_gb": round(tensor_state_bytes(model, optimizer) / 1e9, 3),
        "step_live_peak_gb": None if live_peak is None else round(live_peak / 1e9, 3), "malloc": malloc_name(),
        "flops_per_step": flops, "achieved_tflops": round(flops / seconds / 1e12, 4),
        "matmul_peak_tflops": round(peak / 1e12, 4), "mfu": round(flops / seconds / peak, 4),
        "mfu_vs_datasheet": None if datasheet is None else round(flops / seconds / datasheet, 4),
        "datasheet_peak": datasheet_source, "warmup_steps": args.warmup, "warmup_s": round(warmup_s, 2),
        "torch": torch.__version__,
    }
    if args.profile and device.type == "cuda":
        try:
            record.update(profile_steps(step, device))
        except Exception as err:  # noqa: BLE001 - the timings above stand without the profile
            record["profile_error"] = f"{type(err).__name__}: {err}"
    emit(record)
    return record


def profile_steps(step, device: torch.device, steps: int = 3, top: int = 12) -> dict:
    """Kernel launches per step, GPU-busy share of the wall time (kernel time / step time: far under 1 means the
    host - Python, dispatch, launches - bounds the step) and the kernels with the most time."""
    from torch.profiler import ProfilerActivity, profile

    sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        sync(device)
        wall = time.perf_counter() - start
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy_us = sum(e.device_time_total for e in kernels) if kernels and hasattr(kernels[0], "device_time_total") \
        else sum(e.cuda_time_total for e in kernels)
    by_name: dict[str, list[float]] = {}
    for e in kernels:
        entry = by_name.setdefault(e.name[:90], [0.0, 0])
        entry[0] += getattr(e, "device_time_total", 0.0) or 0.0
        entry[1] += 1
    ranked = sorted(by_name.items(), key=lambda item: -item[1][0])[:top]
    return {"profile_kernels_per_step": round(len(kernels) / steps),
            "profile_gpu_busy_share": round(busy_us / 1e6 / wall, 3),
            "profile_top_kernels_ms_per_step": {name: [round(t / 1e3 / steps, 3), round(n / steps)]
                                                for name, (t, n) in ranked}}


if __name__ == "__main__":
    main()
