"""engine.checkpoint (atomic save, safe load, resume discovery, RNG) and dataset.sampler."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from dataset.sampler import ResumableDistributedSampler
from engine import checkpoint as ckpt


class NotAllowed:
    """A class weights_only unpickling refuses."""

    def __init__(self) -> None:
        self.value = 3


def test_atomic_save_and_load(tmp_path):
    path = tmp_path / "sub" / "c.pth"
    state = {"model": {"w": torch.arange(4.0)}, "step": 3, "config": {"a": [1, "x"]}, "best": None}
    ckpt.save_checkpoint(path, state)
    assert [p.name for p in path.parent.iterdir()] == ["c.pth"]  # no temp file left behind
    loaded = ckpt.load_checkpoint_file(path)
    assert torch.equal(loaded["model"]["w"], state["model"]["w"]) and loaded["step"] == 3
    assert loaded["config"] == {"a": [1, "x"]}


def test_arbitrary_pickle_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {}, "extra": NotAllowed()}, path)
    with pytest.raises(ValueError, match="refused") as err:
        ckpt.load_checkpoint_file(path)
    assert str(path) in str(err.value)


def test_corrupt_and_missing(tmp_path):
    path = tmp_path / "bad.pth"
    path.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ValueError, match="corrupt"):
        ckpt.load_checkpoint_file(path)
    with pytest.raises(FileNotFoundError, match="none.pth"):
        ckpt.load_checkpoint_file(tmp_path / "none.pth")


def test_find_resume_skips_corrupt_newest_and_prunes(tmp_path, caplog):
    for step in (2, 4, 6):
        ckpt.save_checkpoint(tmp_path / ckpt.rolling_name(step), {"step": step})
    (tmp_path / ckpt.rolling_name(8)).write_bytes(b"truncated")
    with caplog.at_level("WARNING", logger="alignfuse"):
        path, state = ckpt.find_resume_checkpoint(tmp_path)
    assert path.name == "checkpoint_00000006.pth" and state["step"] == 6
    assert "checkpoint_00000008.pth" in caplog.text
    ckpt.prune_rolling(tmp_path, keep=2)
    assert [s for s, _ in ckpt.list_rolling(tmp_path)] == [8, 6]
    assert ckpt.find_resume_checkpoint(tmp_path / "empty") is None


def test_rng_round_trip_through_weights_only_file(tmp_path):
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    np.random.randn()  # leaves a cached gaussian in numpy's legacy state
    ckpt.save_checkpoint(tmp_path / "rng.pth", {"rng": ckpt.capture_rng()})
    expected = (torch.rand(3), np.random.rand(3), random.random(), np.random.randn())
    ckpt.restore_rng(ckpt.load_checkpoint_file(tmp_path / "rng.pth")["rng"])
    got = (torch.rand(3), np.random.rand(3), random.random(), np.random.randn())
    assert torch.equal(expected[0], got[0]) and np.array_equal(expected[1], got[1])
    assert expected[2] == got[2] and expected[3] == got[3]


def test_sampler_partitions_pads_and_resumes():
    ranks = [ResumableDistributedSampler(10, shuffle=True, seed=5, num_replicas=3, rank=r) for r in range(3)]
    for s in ranks:
        s.set_epoch(2)
    parts = [list(s) for s in ranks]
    assert all(len(p) == 4 for p in parts)  # ceil(10 / 3), padded
    assert sorted(set().union(*parts)) == list(range(10))
    # Rank r takes every third index of one epoch-seeded permutation.
    assert parts[0][:3] == list(ranks[0]._indices())[:3]

    sampler = ResumableDistributedSampler(list(range(20)), shuffle=True, seed=0, num_replicas=1, rank=0)
    sampler.set_epoch(1)
    full = list(sampler)
    sampler.set_start_batch(3, batch_size=4)
    assert list(sampler) == full[12:] and len(sampler) == 8
    sampler.set_epoch(2)  # a new epoch starts from its beginning, with another order
    second = list(sampler)
    assert len(second) == 20 and second != full


def test_sampler_yields_epoch_and_drop_last():
    sampler = ResumableDistributedSampler(7, shuffle=False, seed=0, num_replicas=2, rank=1, drop_last=True,
                                          yield_epoch=True)
    sampler.set_epoch(4)
    assert list(sampler) == [(1, 4), (3, 4), (5, 4)]
    with pytest.raises(ValueError, match="rank 2"):
        ResumableDistributedSampler(7, num_replicas=2, rank=2)
