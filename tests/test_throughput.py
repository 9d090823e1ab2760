"""Throughput in every run (samples/s, data wait, MFU, the start-up banner) and the GPU check script's --dry mode."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch

from engine import throughput

REPO = Path(__file__).resolve().parents[1]


def test_count_flops_of_a_linear_forward_and_backward():
    layer = torch.nn.Linear(16, 8, bias=False)
    x = torch.randn(4, 16, requires_grad=True)
    _, flops = throughput.count_flops(lambda: layer(x).sum().backward())
    # forward 2*B*in*out; backward: the input gradient and the weight gradient, the same again each
    assert flops == 3 * 2 * 4 * 16 * 8


def test_batch_size_of_finds_the_leading_size():
    assert throughput.batch_size_of({"caption": ["a", "b"], "image": torch.zeros(3, 2)}, 7) == 3
    assert throughput.batch_size_of((torch.zeros(5, 1), torch.zeros(5)), 7) == 5
    assert throughput.batch_size_of({"nested": {"ids": torch.zeros(2, 4)}}, 7) == 2
    assert throughput.batch_size_of({"names": ["a"]}, 7) == 7


def test_step_meter_fields_follow_their_definitions(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(throughput.time, "perf_counter", lambda: now[0])
    meter = throughput.StepMeter(world_size=4, peak_flops=1e12)
    meter.flops_per_sample = 2e9
    meter.record_data_wait(0.5, 32)  # the counted batch: its time and samples are left out
    now[0] += 3.0
    meter.discount(3.0, 32)
    for _ in range(4):
        meter.record_data_wait(0.25, 32)
        now[0] += 1.0
        meter.steps += 1
    meter.steps += 1  # the discounted step was stepped too
    fields = meter.fields()
    assert fields["train/step_time_s"] == pytest.approx(1.0)
    assert fields["train/samples_per_s_per_device"] == pytest.approx(32.0)
    assert fields["train/samples_per_s"] == pytest.approx(128.0)
    assert fields["train/data_wait_share"] == pytest.approx(1.5 / 4.0)  # 0.5 of the counted batch + 4 x 0.25
    assert fields["train/compute_s"] + fields["train/data_wait_s"] == pytest.approx(1.0)
    assert fields["train/mfu"] == pytest.approx(2e9 * 32 / 1e12)
    meter.exclude(10.0)  # an evaluation inside the window
    now[0] += 10.0
    assert meter.fields()["train/step_time_s"] == pytest.approx(1.0)


def test_datasheet_peak_by_device_name(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    peak, source = throughput.device_peak_flops(torch.device("cuda", 0), torch.bfloat16)
    assert peak == 989e12 and "datasheet" in source
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    assert throughput.device_peak_flops(torch.device("cuda", 0), torch.bfloat16)[0] == 312e12
    cpu_peak, cpu_source = throughput.device_peak_flops(torch.device("cpu"), None)
    assert 1e8 < cpu_peak < 1e14 and "measured" in cpu_source


def test_pretrain_log_carries_throughput_and_mfu_and_the_banner(synthetic_dir, tmp_path):
    from Pretrain import main

    out = tmp_path / "run"
    data = synthetic_dir
    main(["--config", str(REPO / "configs/demo/Pretrain.yaml"), "--output_dir", str(out), "--device", "cpu", "--opts",
          f"data.train_file=[{data / 'pretrain.json'}]", f"data.eval_file={data / 'retrieval_test.json'}",
          f"data.eval_image_root={data / 'images'}", f"model.tokenizer={data / 'vocab.txt'}",
          "data.batch_size=8", "data.num_workers=1", "train.max_steps=4", "train.log_every_steps=2",
          "train.eval_every_epochs=0", "scheduler.warmup_steps=1", "model.queue_size=32"])
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    speed = [r for r in records if "train/samples_per_s" in r]
    assert [r["step"] for r in speed] == [2, 4]
    for r in speed:
        assert r["train/samples_per_s"] > 0
        assert r["train/samples_per_s"] == pytest.approx(r["train/samples_per_s_per_device"])  # one process
        assert 0.0 <= r["train/data_wait_share"] <= 1.0
        assert r["train/data_wait_s"] + r["train/compute_s"] == pytest.approx(r["train/step_time_s"])
        assert math.isfinite(r["train/mfu"]) and r["train/mfu"] > 0
        assert r["train/tflops_per_device"] * 1e12 / r["train/mfu"] > 0  # the peak it was divided by
    log = (out / "log.txt").read_text()
    for piece in ("pretrain: training on 1 x CPU", "trainable of", "training samples, 1 loader worker(s)",
                  "8 per rank x 1 ranks x 1 accumulation = 8 per optimizer step", "MFU peak: CPU fp32",
                  "FLOPs per training sample"):
        assert piece in log, piece
    flops = float(log.split("FLOPs per training sample: ")[1].split()[0])
    # The tiny model's forward alone is several MFLOP per sample; forward + backward + momentum forward is more.
    assert 1e6 < flops < 1e10


def test_input_bound_run_is_warned(tmp_path):
    from tests.test_engine_trainer import toy_run
    from tests.toy_task import ToyDataset

    slow_item = ToyDataset.__getitem__

    def slow(self, item):
        time.sleep(0.02)
        return slow_item(self, item)

    ToyDataset.__getitem__ = slow
    try:
        trainer = toy_run(tmp_path, "train.epochs=2", "train.log_every_steps=2", "train.count_flops=false")
    finally:
        ToyDataset.__getitem__ = slow_item
    log = (trainer.output_dir / "log.txt").read_text()
    assert "input-bound" in log and "data.num_workers" in log
    assert log.count("input-bound") == 2  # once an epoch
    records = [json.loads(line) for line in (trainer.output_dir / "log.jsonl").read_text().splitlines()]
    assert all("train/mfu" not in r for r in records)  # count_flops off: no MFU field


@pytest.mark.slow
def test_gpu_check_dry_runs_every_section_on_cpu(tmp_path):
    from benchmarks import gpu_check

    out = tmp_path / "gpu_check.json"
    # The two compile sections are the same scripts with --compile / train.compile (covered by the compile tests).
    results = gpu_check.main(["--dry", "--out", str(out), "--skip", "train_compile,entry_compile"])
    assert json.loads(out.read_text()) == json.loads(json.dumps(results, default=str))
    sections = results["sections"]
    assert list(sections) == ["env", "train_eager", "nccl", "retrieval", "retrieval_no_cudnn", "data", "entry",
                              "train_profile"]
    assert all(rec["status"] == "ok" for rec in sections.values()), {k: v.get("error") for k, v in sections.items()}
    assert sections["train_eager"]["samples_per_s"] > 0 and sections["train_eager"]["flops_per_step"] > 0
    assert sections["nccl"]["collectives_ok"] and sections["nccl"]["backend"] == "gloo"
    assert sections["retrieval"]["total_s"] > 0 and sections["retrieval_no_cudnn"]["no_cudnn_sdpa"]
    assert sections["data"]["loader_images_per_s"]["2"] > 0
    entry = sections["entry"]
    assert entry["returncode"] == 0 and entry["banner"] and entry["samples_per_s"] > 0 and entry["mfu"] > 0
