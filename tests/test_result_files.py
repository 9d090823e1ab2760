"""Result files are never overwritten: numbered names count on from the largest number in the folder, across runs."""

from __future__ import annotations

import json

import pytest
import torch

import engine
import engine.task
from tests.toy_task import ToyTask


def _task(out) -> ToyTask:
    cfg = engine.load_config(None, [], engine.build_schema(ToyTask.config_defaults))
    task = ToyTask(cfg, torch.device("cpu"))
    task.output_dir = out
    return task


def test_numbered_results_count_on_and_never_overwrite(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    task = _task(out)
    assert task.write_result("caption_val_eval{n}.json", [1]) == (out / "caption_val_eval1.json").resolve()
    assert task.write_result("caption_val_eval{n}.json", [2]).name == "caption_val_eval2.json"
    assert task.write_result("caption_test_eval{n}.json", [3]).name == "caption_test_eval1.json"  # its own count
    (out / "caption_val_eval7.json").write_text("[7]")  # e.g. left by an earlier run
    assert task.write_result("caption_val_eval{n}.json", [8]).name == "caption_val_eval8.json"
    assert json.loads((out / "caption_val_eval1.json").read_text()) == [1]
    # Names without {n}: the name itself, then _2, _3, ...
    assert task.write_result("captions_folder.json", ["a"]).name == "captions_folder.json"
    assert task.write_result("captions_folder.json", ["b"]).name == "captions_folder_2.json"
    assert json.loads((out / "captions_folder.json").read_text()) == ["a"]
    assert task.write_result("results/val.json", [0]).name == "val.json"  # sub-folders are created
    # A file taken between choosing the number and writing (another run) is skipped, not replaced.
    monkeypatch.setattr(engine.task, "next_result_number", lambda folder, name: 8)
    assert task.write_result("caption_val_eval{n}.json", [9]).name == "caption_val_eval9.json"
    assert json.loads((out / "caption_val_eval8.json").read_text()) == [8]
    assert not list(out.glob(".result_*"))  # no temporary files left behind


def test_numbered_names_stay_inside_output_dir(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ValueError, match="would write outside output_dir"):
        _task(out).write_result("../escape_{n}.json", [1])
    assert not (tmp_path / "escape_1.json").exists()


def test_results_without_hard_links(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()

    def no_links(source, target):
        raise PermissionError("hard links not supported")

    monkeypatch.setattr(engine.task.os, "link", no_links)
    task = _task(out)
    assert task.write_result("val_eval{n}.json", [1]).name == "val_eval1.json"
    assert task.write_result("val_eval{n}.json", [2]).name == "val_eval2.json"
    assert json.loads((out / "val_eval1.json").read_text()) == [1]
    assert not list(out.glob(".result_*"))
