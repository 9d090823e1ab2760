"""Web-scale data (issue 21): webdataset shards through dataset.shards.

- the converter's round trip (python -m dataset.shards): the shards hold exactly the JSON's pairs;
- 2 processes x 2 loader workers see every sample of a pass exactly once, also with weighted sources over their
  counted passes, and a loader resumed at batch b yields the uninterrupted epoch's batches from b on;
- faults (undecodable image, sample without caption, truncated tar, missing shard) are replaced, counted and named,
  the epoch keeps its length; the per-source guard stops a source that is mostly broken;
- Pretrain.py from shards under torchrun with loader workers: SIGTERM mid-epoch + --resume auto == uninterrupted.
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import cv2
import pytest
import torch

from dataset.loader import create_loader, shutdown_workers
from dataset.shards import MANIFEST, EpochPlan, ShardStream, stable_id
from dataset.shards import main as shards_main
from dataset.synthetic import main as synthetic_main
from dataset.transforms import build_transform
from engine import checkpoint as ckpt
from tests.test_engine_dist import free_port
from tests.test_preemption import child_env, comm, finish, job_processes

REPO = Path(__file__).resolve().parents[1]
PER_SHARD = 7  # the synthetic pretraining set's 56 pairs -> 8 shards of 7


def all_shards(folder: Path) -> str:
    count = len(json.loads((folder / MANIFEST).read_text())["shards"])
    return str(folder / f"{{00000..{count - 1:05d}}}.tar")


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """The demo data generator's command line with --shards: its pretraining pairs also as shards."""
    out = tmp_path_factory.mktemp("demo")
    synthetic_main(["--out", str(out), "--num-images", "80", "--image-size", "64", "--seed", "0", "--shards",
                    str(PER_SHARD)])
    return out


@pytest.fixture(scope="module")
def shards(demo) -> Path:
    manifest = json.loads((demo / "pretrain_shards" / MANIFEST).read_text())
    assert (len(manifest["shards"]), manifest["total"]) == (8, 56)
    return demo / "pretrain_shards"


def test_converter_round_trip(demo, tmp_path):
    """python -m dataset.shards on two annotation files: the shards hold exactly their pairs, the manifest counts."""
    anns = [demo / "pretrain.json", demo / "retrieval_train.json"]
    shards_main(["--ann", *map(str, anns), "--image_root", str(demo / "images"), "--out", str(tmp_path),
                 "--samples_per_shard", "50"])
    entries = [entry for ann in anns for entry in json.loads(ann.read_text())]
    check_round_trip(entries, tmp_path, demo / "images")
    # Retrieval training's items: ITC positives by the entries' image_id (kept in the json member).
    stream = ShardStream(all_shards(tmp_path), build_transform("test", 16), "retrieval_train", shuffle=False)
    loader = create_loader(stream, 8, train=True, num_workers=0, collate_fn=lambda items: items, seed=0)
    loader.sampler.set_epoch(0)
    items = [item for batch in loader for item in batch]
    assert len(items) == -(-len(entries) // 8) * 8  # the last batch filled up with repeats
    for item in items:
        entry = entries[int(item["key"])]
        assert item["image_idx"] == stable_id(entry.get("image_id", item["key"]))


def test_demo_shards_hold_the_demo_pretraining_pairs(demo, shards):
    check_round_trip(json.loads((demo / "pretrain.json").read_text()), shards, demo / "images")


def check_round_trip(entries: list[dict], shards: Path, image_root: Path) -> None:
    expected = collections.Counter()
    for entry in entries:
        captions = entry["caption"] if isinstance(entry["caption"], list) else [entry["caption"]]
        expected[(hashlib.sha1((image_root / entry["image"]).read_bytes()).hexdigest(), tuple(captions))] += 1
    manifest = json.loads((shards / MANIFEST).read_text())
    found = collections.Counter()
    for name, count in manifest["shards"].items():
        with tarfile.open(shards / name) as tar:
            members = {member.name: tar.extractfile(member).read() for member in tar.getmembers()}
        keys = sorted({name.split(".", 1)[0] for name in members})
        assert len(keys) == count, f"{name}: manifest says {count}, tar holds {len(keys)}"
        for key in keys:
            meta = json.loads(members[f"{key}.json"])
            captions = tuple(members[f"{key}.txt"].decode().split("\n"))
            assert list(captions) == (meta["caption"] if isinstance(meta["caption"], list) else [meta["caption"]])
            found[(hashlib.sha1(members[f"{key}.jpg"]).hexdigest(), captions)] += 1
    assert manifest["total"] == len(entries)
    assert found == expected


def test_plan_balances_streams_and_steps():
    """Every rank takes the same number of steps; a stream's batches cover its samples; repeats are counted."""
    for sizes, ranks, workers, batch in [([56], 2, 2, 4), ([14, 42], 2, 2, 2), ([1000, 7, 333], 3, 5, 8),
                                         ([10], 2, 4, 1), ([5, 5, 5, 5, 5, 5, 5, 5, 5, 3], 2, 2, 2), ([0, 9], 1, 3, 4)]:
        plan = EpochPlan(sizes, ranks, workers, batch)
        assert [sum(plan.allot[i][s] for i in range(ranks * workers)) for s in range(len(sizes))] == sizes
        for i, length in enumerate(plan.lengths):
            assert plan.stream_batches(i % workers) * batch >= length
        assert plan.steps == sum(plan.stream_batches(w) for w in range(workers))
        assert plan.padding == ranks * plan.steps * batch - sum(sizes)
        assert plan.padding < ranks * workers * 2 * batch
        assert max(plan.lengths) - min(plan.lengths) <= 1  # even shares, whatever the mix of sources
    even = EpochPlan([56], 2, 2, 2)
    assert (even.steps, even.padding) == (14, 0)


def collect_keys(rank: int, port: int, spec: dict, out: str) -> None:
    """One of 2 gloo ranks (forked from the test process): the keys its loader (2 workers, batches of 2) yields."""
    import torch.distributed as torch_dist

    from common import dist

    torch_dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)

    def keys(config: dict, epoch: int, start: int = 0) -> list:
        stream = ShardStream(config["shards"], build_transform("test", 16), samples_per_epoch=config["per_epoch"],
                             shuffle_buffer=5, seed=3)
        loader = create_loader(stream, 2, train=True, num_workers=2, seed=3,
                               collate_fn=lambda items: [(item["key"], item["num_skipped"]) for item in items])
        loader.sampler.set_epoch(epoch)
        if start:
            loader.sampler.set_start_batch(start, 2)
        batches = list(loader)
        assert len(batches) == len(loader), (len(batches), len(loader))
        shutdown_workers(loader)
        return batches

    result = {name: [keys(config, epoch) for epoch in range(config["epochs"])] for name, config in spec.items()}
    result["resumed"] = keys(spec["plain"], 1, start=5)
    gathered = dist.all_gather_object(result)
    if rank == 0:
        Path(out).write_text(json.dumps(gathered))
    torch_dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.dist
def test_two_processes_two_workers_see_each_sample_once(shards, tmp_path):
    """2 gloo ranks x 2 loader workers, batches of 2: one pass over 8 shards, then two weighted sources (1:3) at 32
    samples per epoch for 7 epochs: 2 passes of the first, 6 of the second, each sample exactly that often."""
    first, second = str(shards / "{00000..00003}.tar"), str(shards / "{00004..00007}.tar")
    spec = {"plain": {"shards": all_shards(shards), "per_epoch": 0, "epochs": 2},
            "mixed": {"shards": [{"urls": first, "weight": 1}, {"urls": second, "weight": 3.0}], "per_epoch": 32,
                      "epochs": 7}}
    out = tmp_path / "keys.json"
    # Forked, not spawned: the ranks start without importing torch again (seconds each on 2 shared cores). OpenCV's
    # thread pool is wound down first, as create_loader does before forking its workers (see dataset.loader).
    cv2.setNumThreads(1)
    torch.multiprocessing.start_processes(collect_keys, args=(free_port(), spec, str(out)), nprocs=2, join=True,
                                          start_method="fork")
    ranks = json.loads(out.read_text())
    keys_of = {n: {f"{k:09d}" for k in range(n * PER_SHARD, (n + 4) * PER_SHARD)} for n in (0, 4)}
    for epoch in range(2):
        steps = [len(rank["plain"][epoch]) for rank in ranks]
        assert steps == [14, 14], steps  # 56 samples / (2 ranks x batch 2), the same on both ranks
        seen = [key for rank in ranks for batch in rank["plain"][epoch] for key, skipped in batch if not skipped]
        assert sorted(seen) == sorted(keys_of[0] | keys_of[4]), f"epoch {epoch}: not every sample exactly once"
    assert ranks[0]["plain"][0] != ranks[0]["plain"][1], "the epochs should differ in order"
    for rank in ranks:
        assert rank["resumed"] == rank["plain"][1][5:], "resuming at batch 5 must continue the same epoch"
    counts = collections.Counter(key for rank in ranks for epoch in rank["mixed"] for batch in epoch
                                 for key, _ in batch)
    assert all(len(epoch) == 8 for rank in ranks for epoch in rank["mixed"])  # 32 / (2 x 2)
    assert {key: counts[key] for key in keys_of[0]} == dict.fromkeys(keys_of[0], 2)
    assert {key: counts[key] for key in keys_of[4]} == dict.fromkeys(keys_of[4], 6)
    for rank in ranks:  # mixing per batch, not per epoch: batches hold both sources
        mixed_batches = [batch for epoch in rank["mixed"] for batch in epoch
                         if len({key in keys_of[0] for key, _ in batch}) == 2]
        assert len(mixed_batches) >= 8


def damage(shards: Path, out: Path) -> dict[str, str]:
    """A copy of the shards with: shard 1 missing, shard 2 truncated after its 3rd sample, an undecodable image in
    shard 3, a sample without caption in shard 4. Returns the damaged keys."""
    shutil.copytree(shards, out)
    (out / "00001.tar").unlink()
    with tarfile.open(out / "00002.tar") as tar:
        cut = [member for member in tar.getmembers() if member.name.endswith(".jpg")][3].offset
    with open(out / "00002.tar", "r+b") as file:
        file.truncate(cut + 100)
    for name, drop, garbage in (("00003.tar", None, "jpg"), ("00004.tar", "txt", None)):
        with tarfile.open(out / name) as tar:
            members = [(member, tar.extractfile(member).read()) for member in tar.getmembers()]
        victim = members[5][0].name.split(".")[0]
        with tarfile.open(out / name, "w") as tar:
            for member, data in members:
                if member.name == f"{victim}.{drop}":
                    continue
                if member.name == f"{victim}.{garbage}":
                    data = b"\xff\xd8 not a jpeg"
                member.size = len(data)
                tar.addfile(member, io.BytesIO(data))
    return {"missing": "00001.tar", "truncated": "00002.tar"}


def test_faults_are_replaced_counted_and_named(shards, tmp_path, caplog):
    broken = tmp_path / "broken"
    damage(shards, broken)
    batches_by_workers = {}
    for workers in (0, 2):
        stream = ShardStream(all_shards(broken), build_transform("test", 16), shuffle_buffer=4, seed=0,
                             max_bad_image_fraction=0.5)
        loader = create_loader(stream, 4, train=True, num_workers=workers, collate_fn=lambda items: items, seed=0)
        with caplog.at_level(logging.WARNING, logger="dataset.shards"):
            loader.sampler.set_epoch(0)
            batches = list(loader)
        shutdown_workers(loader)
        assert len(batches) == len(loader) == 14 and all(len(batch) == 4 for batch in batches)
        batches_by_workers[workers] = batches
        # 7 (missing shard) + 4 (truncated after 3 of 7) + 1 (no caption) + 1 (undecodable) replaced positions.
        assert sum(item["num_skipped"] for batch in batches for item in batch) == 13
    # Batches of 1: the undecodable image's batch has no good item of its own; the next sample stands in.
    single = ShardStream(all_shards(broken), build_transform("test", 16), shuffle_buffer=4, seed=0,
                         max_bad_image_fraction=0.5)
    loader = create_loader(single, 1, train=True, num_workers=0, collate_fn=lambda items: items, seed=0)
    loader.sampler.set_epoch(0)
    items = [item for batch in loader for item in batch]
    assert len(items) == 56 and sum(item["num_skipped"] for item in items) == 13
    log = caplog.text  # the in-process runs (0 workers) logged here
    assert "00001.tar: samples 0..6 of 7 missing (FileNotFoundError: [Errno 2] No such file" in log
    assert "00002.tar: samples 3..6 of 7 missing (the shard ended after 3 samples" in log
    assert "cannot use image" in log and "00003.tar" in log and "no caption" in log
    # The guard, per source: at the default 1% this source is judged broken, with an error naming it.
    strict = ShardStream(all_shards(broken), build_transform("test", 16), shuffle_buffer=4, seed=0)
    loader = create_loader(strict, 4, train=True, num_workers=0, collate_fn=lambda items: items, seed=0)
    loader.sampler.set_epoch(0)
    with pytest.raises(RuntimeError, match="evidence that more than max_bad_image_fraction=1.0% of this source"):
        list(loader)


def test_missing_counts_and_bad_specs_are_clear_errors(shards, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(shards / "00000.tar", bare / "00000.tar")
    with pytest.raises(ValueError, match="no sample count for shard .*00000.tar.*--count"):
        ShardStream(str(bare / "00000.tar"), build_transform("test", 16))
    shards_main(["--count", str(bare / "00000.tar"), "--out", str(bare)])
    assert json.loads((bare / MANIFEST).read_text())["shards"] == {"00000.tar": PER_SHARD}
    with pytest.raises(FileNotFoundError, match="training shard .*nowhere/00000.tar does not exist"):
        ShardStream(str(tmp_path / "nowhere" / "{00000..00003}.tar"), build_transform("test", 16))
    for spec, match in [([{"urls": all_shards(shards), "weight": 0}], "weight must be a number > 0"),
                        ([{"url": "x"}], "expected a URL pattern or a mapping with 'urls'"),
                        (5, "must be a shard URL pattern")]:
        with pytest.raises(ValueError, match=match):
            ShardStream(spec, build_transform("test", 16))


def test_fewer_shards_than_streams_warns_and_still_reads_each_sample(shards, caplog):
    """1 shard for 2 loader workers: a warning says what happens; every sample is still read, plus the counted
    balancing repeats."""
    stream = ShardStream(str(shards / "00000.tar"), build_transform("test", 16), shuffle_buffer=4)
    with caplog.at_level(logging.WARNING, logger="dataset.shards"):
        loader = create_loader(stream, 2, train=True, num_workers=2, collate_fn=lambda items: items, seed=0)
    assert "1 shards for 2 streams (1 ranks x 2 loader workers): streams share shards" in caplog.text
    loader.sampler.set_epoch(0)
    keys = [item["key"] for batch in loader for item in batch]
    shutdown_workers(loader)
    assert set(keys) == {f"{k:09d}" for k in range(PER_SHARD)}
    assert len(keys) == PER_SHARD + stream.plan.padding == len(loader) * 2


def test_resume_skips_without_decoding(shards, monkeypatch):
    """Resuming at batch 5 of 14 reads the skipped samples' bytes but decodes only the 9 batches it yields, and
    yields what the uninterrupted epoch yields from batch 5 on."""
    import dataset.shards as shards_module

    decoded = []
    real_decode = shards_module.decode_image
    monkeypatch.setattr(shards_module, "decode_image", lambda data, path, *a: decoded.append(path) or
                        real_decode(data, path, *a))
    batches = {}
    for start in (0, 5):
        stream = ShardStream(all_shards(shards), build_transform("pretrain", 16), shuffle_buffer=6, seed=1)
        loader = create_loader(stream, 4, train=True, num_workers=0, collate_fn=lambda items: items, seed=1)
        loader.sampler.set_epoch(2)
        loader.sampler.set_start_batch(start, 4)
        decoded.clear()
        batches[start] = list(loader)
        assert len(decoded) == (14 - start) * 4
    assert [[item["key"] for item in batch] for batch in batches[5]] == \
        [[item["key"] for item in batch] for batch in batches[0][5:]]
    assert all(torch.equal(a["image"], b["image"]) for x, y in zip(batches[5], batches[0][5:], strict=True)
               for a, b in zip(x, y, strict=True))  # the same augmentation too


def test_pipe_urls_read_with_a_manifest(shards):
    """`pipe:` commands (e.g. `aws s3 cp ... -`) read like files; their counts come from the source's manifest."""
    spec = [{"urls": f"pipe:cat {all_shards(shards)}", "manifest": str(shards / MANIFEST)}]
    stream = ShardStream(spec, build_transform("test", 16), shuffle_buffer=4)
    loader = create_loader(stream, 8, train=True, num_workers=0, collate_fn=lambda items: items, seed=0)
    loader.sampler.set_epoch(0)
    keys = [item["key"] for batch in loader for item in batch if not item["num_skipped"]]
    assert sorted(keys) == [f"{k:09d}" for k in range(56)]


# ------------------------------------------------------------------------------ Pretrain.py: SIGTERM + resume
STEPS = 12  # 8 steps per epoch (56 samples: 14 per stream -> 4 batches of 4 per worker): crosses an epoch end
SIGNAL_AFTER = 3


def pretrain_argv(data: Path, shards: Path, out: Path, *flags: str) -> list[str]:
    """Pretrain.py's flags: the demo config from shards, STEPS steps of batch 4 per rank, 2 loader workers."""
    return ["--config", str(REPO / "configs" / "demo" / "Pretrain.yaml"), "--output_dir", str(out), "--device", "cpu",
            *flags, "--opts", "data.train_file=[]", f"data.train_shards={all_shards(shards)}", "data.shuffle_buffer=8",
            "data.eval_file=", f"model.tokenizer={data / 'vocab.txt'}", "data.batch_size=4", "data.num_workers=2",
            "model.queue_size=32", "scheduler.warmup_steps=2", "train.epochs=100", f"train.max_steps={STEPS}",
            "train.log_every_steps=1"]


def launch_shards(data: Path, shards: Path, out: Path, *flags: str) -> subprocess.Popen:
    """Pretrain.py from shards through `python -m engine.launch` (torchrun, 2 gloo ranks x 2 loader workers)."""
    cmd = [sys.executable, "-m", "engine.launch", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(REPO / "Pretrain.py"), *pretrain_argv(data, shards, out, *flags)]
    return subprocess.Popen(cmd, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def pretrain_rank(rank: int, port: int, argv: list[str]) -> None:
    """One of 2 gloo ranks of the uninterrupted reference run, forked from the test process (no torchrun: the
    launcher changes nothing in the maths, and a forked rank skips seconds of imports)."""
    from engine import build_trainer
    from Pretrain import PretrainTask  # imported by the test before the fork

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    trainer = build_trainer(PretrainTask, argv)
    try:
        trainer.fit()
    finally:
        trainer.close()


@pytest.mark.slow
@pytest.mark.dist
def test_pretrain_from_shards_sigterm_and_resume_equals_uninterrupted(demo, shards, tmp_path):
    """The demo generator's shards, through Pretrain.py under torchrun with loader workers."""
    import Pretrain  # noqa: F401 - imported once here, inherited by the forked ranks

    synthetic_dir = demo
    cv2.setNumThreads(1)  # before forking the ranks (see test_two_processes_two_workers_see_each_sample_once)
    argv = pretrain_argv(demo, shards, tmp_path / "full")
    torch.multiprocessing.start_processes(pretrain_rank, args=(free_port(), argv), nprocs=2, join=True,
                                          start_method="fork")
    log = (tmp_path / "full" / "log.txt").read_text()
    assert "shards: 56 samples per epoch" in log and "8 batches of 4 per rank x 2 ranks" in log, log[-3000:]
    reference = ckpt.load_checkpoint_file(tmp_path / "full" / "checkpoint_last.pth")
    assert reference["step"] == STEPS

    out = tmp_path / "run"
    proc = launch_shards(synthetic_dir, shards, out)
    log, deadline = out / "log.txt", time.monotonic() + 120
    while not (log.is_file() and f"step {SIGNAL_AFTER}/{STEPS} " in log.read_text()):
        assert proc.poll() is None, proc.communicate()[1][-4000:]
        assert time.monotonic() < deadline, "the run did not reach the signal step"
        time.sleep(0.05)
    pids = job_processes(proc.pid)
    assert len([pid for pid in pids if comm(pid) == "pt_data_worker"]) == 4
    os.kill(proc.pid, signal.SIGTERM)
    rc, output = finish(proc, timeout=120)
    assert rc == 0 and "stopped by SIGTERM: resumable checkpoint written" in output, output[-4000:]
    stopped = ckpt.load_checkpoint_file(out / "checkpoint_last.pth")
    assert SIGNAL_AFTER <= stopped["step"] < STEPS and stopped["step"] % 8, f"stopped at step {stopped['step']}"

    rc, output = finish(launch_shards(synthetic_dir, shards, out, "--resume", "auto"))
    assert rc == 0, output[-4000:]
    final = ckpt.load_checkpoint_file(out / "checkpoint_last.pth")
    assert final["step"] == STEPS
    differ = [key for key, value in reference["model"].items() if not torch.equal(final["model"][key], value)]
    assert not differ, f"{len(differ)} of {len(reference['model'])} tensors differ from the uninterrupted run"


@pytest.mark.slow
def test_retrieval_trains_from_shards_through_its_entry_script(demo, tmp_path):
    """Retrieval.py with data.train_shards (the demo's retrieval pairs converted by the CLI) and 2 loader workers:
    the run takes its steps, its ITC/ITM losses are finite, and every image the idx queue holds is a shard sample's
    image id (the positives of retrieval training come from json["image_id"])."""
    from Retrieval import main

    entries = json.loads((demo / "retrieval_train.json").read_text())
    shards_main(["--ann", str(demo / "retrieval_train.json"), "--image_root", str(demo / "images"), "--out",
                 str(tmp_path / "shards"), "--samples_per_shard", "20"])
    out = tmp_path / "run"
    main(["--config", str(REPO / "configs" / "demo" / "Retrieval.yaml"), "--output_dir", str(out), "--device", "cpu",
          "--opts", "data.train_file=[]", f"data.train_shards={all_shards(tmp_path / 'shards')}", "data.val_file=",
          "data.test_file=", f"model.tokenizer={demo / 'vocab.txt'}", "data.batch_size=8", "data.num_workers=2",
          "data.shuffle_buffer=8", "train.max_steps=4", "train.log_every_steps=1", "train.count_flops=false"])
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    losses = [r for r in records if "train/loss_ita" in r]
    assert [r["step"] for r in losses] == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor([r["train/loss_ita"], r["train/loss_itm"]])).all() for r in losses)
    state = torch.load(out / "checkpoint_last.pth", weights_only=True)
    queue = state["model"]["idx_queue"].flatten()
    assert int((queue != -100).sum()) == 4 * 8  # 4 steps of 8 samples entered the queue
    queued, ids = set(queue.tolist()) - {-100}, {stable_id(entry["image_id"]) for entry in entries}
    assert queued <= ids, sorted(queued - ids)[:5]  # image ids 1..56; sample keys (0..167) would fall outside
