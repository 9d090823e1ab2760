"""The one GPU check: every GPU target of the toolkit measured in one command, one JSON file.

    python benchmarks/gpu_check.py --out gpu_check.json           # one H100/H200: about 6-8 minutes
    python benchmarks/gpu_check.py --dry --out /tmp/gpu_dry.json  # CPU, tiny sizes, ~2 minutes (the test suite runs it)

Sections, each in a subprocess of its own (a crash or a timeout in one leaves the others' results), in this order:
  env            torch / CUDA / device, and a bf16 8192^3 matmul rate (the ceiling the MFU figures are read against)
  train_eager    the base pretraining step (ViT-B/16 at 256 px, BERT-base, queue 65536) at batch 64, bf16 autocast,
                 fused AdamW: samples/s, MFU (vs the measured matmul rate and the datasheet), max memory
  nccl           a one-process nccl process group: all_reduce of 256 MB bf16, broadcast, all_gather_object
  retrieval      the two-stage retrieval evaluation at base size (1000 images x 5000 texts, k_test 128, bf16)
  retrieval_no_cudnn  the same with attention kept off cuDNN's kernels (which plan per shape; the re-rank's passes
                 come in many shapes)
  data           the pretraining data pipeline: images/s of one worker and of DataLoaders with 8 and 16 workers
  entry          Pretrain.py itself (demo config, synthetic data, loader workers) on the device: the engine's logged
                 samples/s, data-wait share and MFU, and its start-up banner
  train_profile  train_eager's step under torch.profiler: kernel launches per step, the share of the step the GPU
                 is busy (far under 1: the host bounds the step), the kernels that take the most time
  train_compile  train_eager under torch.compile (inductor): the compile time (warmup_s) and the compiled step
  entry_compile  Pretrain.py with train.compile=true: three different text lengths, no recompile storm
``--dry`` runs every section on the CPU at the demo's tiny size (gloo instead of nccl, aot_eager instead of inductor)
so that the script is exercised by the tests while no GPU is there. The JSON is rewritten after every section; the
summary table is printed last. ``--only a,b`` / ``--skip a,b`` pick sections; ``--budget-s`` bounds the whole run.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ["env", "train_eager", "nccl", "retrieval", "retrieval_no_cudnn", "data", "entry", "train_profile",
            "train_compile", "entry_compile"]
TIMEOUT_S = {"env": 120, "train_eager": 180, "nccl": 90, "retrieval": 150, "retrieval_no_cudnn": 150, "data": 150,
             "entry": 180, "train_profile": 120, "train_compile": 300, "entry_compile": 240}


def _train_step_argv(dry: bool, compile_: bool) -> list[str]:
    if dry:
        argv = ["--size", "tiny", "--batch", "4", "--steps", "2", "--warmup", "1", "--device", "cpu"]
        return argv + (["--compile", "--compile-backend", "aot_eager"] if compile_ else [])
    argv = ["--size", "base", "--batch", "64", "--amp", "bf16", "--device", "cuda", "--steps", "10", "--warmup", "3"]
    return argv + (["--compile"] if compile_ else [])


def section_env(dry: bool) -> dict[str, Any]:
    import torch

    from engine.throughput import device_peak_flops, measured_matmul_flops

    out: dict[str, Any] = {"torch": torch.__version__, "python": sys.version.split()[0], "cpus": os.cpu_count(),
                           "cuda_available": torch.cuda.is_available()}
    if dry or not torch.cuda.is_available():
        device = torch.device("cpu")
        out["matmul_fp32_tflops"] = round(measured_matmul_flops(device, torch.float32, size=512) / 1e12, 4)
        return out
    device = torch.device("cuda")
    props = torch.cuda.get_device_properties(device)
    out.update(cuda=torch.version.cuda, device=props.name, capability=f"{props.major}.{props.minor}",
               memory_gb=round(props.total_memory / 1e9, 1), multiprocessors=props.multi_processor_count,
               cudnn=torch.backends.cudnn.version(), nccl=".".join(map(str, torch.cuda.nccl.version())))
    rate = measured_matmul_flops(device, torch.bfloat16, size=8192, repeats=10)
    out["matmul_bf16_8192_tflops"] = round(rate / 1e12, 1)
    peak, source = device_peak_flops(device, torch.bfloat16)
    out["datasheet_bf16_tflops"] = round(peak / 1e12, 1)
    out["datasheet_source"] = source
    return out


def section_train(dry: bool, compile_: bool, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    from benchmarks import train_step

    return train_step.main(_train_step_argv(dry, compile_) + list(extra))  # later flags override earlier ones


def section_nccl(dry: bool) -> dict[str, Any]:
    import torch
    import torch.distributed as torch_dist

    backend = "gloo" if dry else "nccl"
    device = torch.device("cpu") if dry else torch.device("cuda", 0)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    with socket.socket() as sock:  # a free port for the one-process store
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    store = torch_dist.TCPStore("127.0.0.1", port, 1, is_master=True)
    torch_dist.init_process_group(backend, store=store, rank=0, world_size=1,
                                  device_id=device if device.type == "cuda" else None)
    try:
        numel = (1 << 20) if dry else (128 << 20)  # 256 MB of bf16 on the GPU
        tensor = torch.ones(numel, dtype=torch.bfloat16, device=device)
        torch_dist.all_reduce(tensor)  # warm-up: communicator set-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(10):
            torch_dist.all_reduce(tensor)
        if device.type == "cuda":
            torch.cuda.synchronize()
        all_reduce_ms = (time.perf_counter() - start) / 10 * 1e3
        torch_dist.broadcast(tensor, src=0)
        gathered = [None]
        torch_dist.all_gather_object(gathered, {"rank": 0})
        ok = bool(tensor[0].item() == 1.0) and gathered == [{"rank": 0}]
    finally:
        torch_dist.destroy_process_group()
    return {"backend": backend, "world_size": 1, "all_reduce_mb": numel * 2 / 1e6,
            "all_reduce_ms": round(all_reduce_ms, 3), "collectives_ok": ok}


def section_retrieval(dry: bool, no_cudnn: bool) -> dict[str, Any]:
    from benchmarks import retrieval_eval

    if dry:
        argv = ["--size", "tiny", "--images", "16", "--texts", "80", "--k-test", "4"]
    else:
        argv = ["--size", "base", "--images", "1000", "--texts", "5000", "--k-test", "128", "--device", "cuda",
                "--amp", "bf16", "--query-batch", "32"]
    return retrieval_eval.main(argv + (["--no-cudnn-sdpa"] if no_cudnn else []))


def section_data(dry: bool) -> dict[str, Any]:
    from benchmarks import data_pipeline

    if dry:
        return data_pipeline.main(["--num-images", "16", "--rounds", "1", "--workers", "2"])
    return data_pipeline.main(["--num-images", "1024", "--rounds", "1", "--workers", "8", "16"])


def _pretrain_run(dry: bool, compile_: bool) -> dict[str, Any]:
    """Pretrain.py through torchrun (one process) on synthetic data; the engine's own log records come back."""
    from dataset.synthetic import generate

    with tempfile.TemporaryDirectory() as tmp:
        data, out = Path(tmp) / "data", Path(tmp) / "out"
        generate(data, num_images=120 if dry else 600, image_size=64, seed=0)
        steps = 3 if compile_ else (4 if dry else 40)
        opts = [f"model.tokenizer={data / 'vocab.txt'}", f"data.train_file=[{data / 'pretrain.json'}]",
                f"data.eval_file={data / 'retrieval_test.json'}", f"data.eval_image_root={data / 'images'}",
                f"train.max_steps={steps}", "train.epochs=100", "train.eval_every_epochs=0",
                f"train.log_every_steps={1 if compile_ else (2 if dry else 10)}", "scheduler.warmup_steps=1",
                f"data.num_workers={1 if dry else 4}", f"data.batch_size={8 if dry else 32}"]
        if compile_:
            opts += ["train.compile=true", f"train.compile_backend={'aot_eager' if dry else 'inductor'}"]
        if not dry:
            opts += ["train.amp=bf16"]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", "--master_port",
               str(_free_port()), str(REPO / "Pretrain.py"), "--config", str(REPO / "configs/demo/Pretrain.yaml"),
               "--output_dir", str(out), "--device", "cpu" if dry else "cuda", "--opts", *opts]
        env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        if compile_:
            env["TORCH_LOGS"] = "recompiles"  # counted below: a recompile every step is the failure to catch
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=TIMEOUT_S["entry"])
        wall = time.perf_counter() - start
        records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()] \
            if (out / "log.jsonl").exists() else []
    train = [r for r in records if "train/samples_per_s" in r]
    text = proc.stdout + proc.stderr
    result: dict[str, Any] = {"returncode": proc.returncode, "wall_s": round(wall, 1), "steps": steps,
                              "banner": "MFU peak:" in text, "recompile_messages": text.count("Recompiling")}
    if train:
        last = train[-1]
        result.update({key.removeprefix("train/"): round(last[key], 5) for key in
                       ("train/samples_per_s", "train/step_time_s", "train/data_wait_share", "train/mfu",
                        "train/total_loss") if key in last})
    if proc.returncode != 0:
        result["error_tail"] = text[-4000:]
    return result


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_section(name: str, dry: bool) -> dict[str, Any]:
    if name == "env":
        return section_env(dry)
    if name in ("train_eager", "train_compile"):
        return section_train(dry, compile_=name == "train_compile")
    if name == "train_profile":
        return section_train(dry, compile_=False, extra=("--profile", "--steps", "2", "--warmup", "2"))
    if name == "nccl":
        return section_nccl(dry)
    if name in ("retrieval", "retrieval_no_cudnn"):
        return section_retrieval(dry, no_cudnn=name == "retrieval_no_cudnn")
    if name == "data":
        return section_data(dry)
    if name in ("entry", "entry_compile"):
        return _pretrain_run(dry, compile_=name == "entry_compile")
    raise ValueError(f"unknown section {name!r}; sections: {SECTIONS}")


def _last_json_line(text: str) -> dict[str, Any] | None:
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None


def _summary(results: dict[str, Any]) -> str:
    rows = []
    for name, rec in results.get("sections", {}).items():
        if rec.get("status") != "ok":
            rows.append(f"{name:14s} {rec.get('status')}: {str(rec.get('error', ''))[-160:]}")
            continue
        keys = ("device", "matmul_bf16_8192_tflops", "matmul_fp32_tflops", "median_step_s", "samples_per_s", "mfu",
                "profile_kernels_per_step", "profile_gpu_busy_share",
                "mfu_vs_datasheet", "peak_memory_gb", "warmup_s", "total_s", "rerank_s", "all_reduce_ms",
                "collectives_ok", "opencv_images_per_s", "loader_images_per_s", "step_time_s", "data_wait_share",
                "banner", "recompile_messages", "returncode")
        shown = ", ".join(f"{k}={rec[k]}" for k in keys if k in rec)
        rows.append(f"{name:14s} {rec['seconds']:6.1f}s  {shown}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry", action="store_true", help="CPU, tiny sizes (what the test suite runs)")
    parser.add_argument("--out", default="gpu_check.json", help="the JSON file written (after every section)")
    parser.add_argument("--only", default="", help="comma-separated sections to run (default: all)")
    parser.add_argument("--skip", default="", help="comma-separated sections to leave out")
    parser.add_argument("--budget-s", type=float, default=540.0, help="no section starts past this many seconds")
    parser.add_argument("--section", default=None, help=argparse.SUPPRESS)  # internal: run one section here
    args = parser.parse_args(argv)
    if args.section:
        print(json.dumps(run_section(args.section, args.dry), default=str), flush=True)
        return {}
    chosen = [s.strip() for s in args.only.split(",") if s.strip()] or list(SECTIONS)
    skipped = {s.strip() for s in args.skip.split(",") if s.strip()}
    unknown = sorted((set(chosen) | skipped) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {unknown}; sections: {', '.join(SECTIONS)}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"dry": args.dry, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "sections": {}}
    start = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for name in (s for s in chosen if s not in skipped):
        left = args.budget_s - (time.perf_counter() - start)
        if left < 20:
            results["sections"][name] = {"status": "not run (budget spent)", "seconds": 0.0}
            continue
        timeout = min(TIMEOUT_S[name], left)
        section_start = time.perf_counter()
        print(f"[gpu_check] {name} (timeout {timeout:.0f} s)", flush=True)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--section", name] + (["--dry"] if args.dry else [])
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
            record = _last_json_line(proc.stdout)
            if proc.returncode == 0 and record is not None:
                record = {"status": "ok", **record}
            else:
                record = {"status": f"failed (exit {proc.returncode})", "error": (proc.stdout + proc.stderr)[-3000:]}
        except subprocess.TimeoutExpired as err:
            tail = (err.stdout or b"")[-1500:] + (err.stderr or b"")[-1500:]
            record = {"status": f"timed out after {timeout:.0f} s",
                      "error": tail.decode(errors="replace") if isinstance(tail, bytes) else str(tail)}
        record["seconds"] = round(time.perf_counter() - section_start, 1)
        results["sections"][name] = record
        results["total_s"] = round(time.perf_counter() - start, 1)
        out.write_text(json.dumps(results, indent=1, default=str))
    print(_summary(results), flush=True)
    print(f"[gpu_check] wrote {out}", flush=True)
    return results


if __name__ == "__main__":
    main()
