"""User mistakes through the real entry points: one message on stderr, exit status 2, no traceback (engine.errors);
--debug / ALIGNFUSE_DEBUG=1 show the traceback; programming errors keep theirs. Wrong checkpoints are refused with
a message naming what does not fit (engine.checkpoint.check_fit).

The subprocess tests start the scripts as a user does (`python Retrieval.py ...`); the others call the same
command-line path in this process (`main()` reading a patched sys.argv), which saves a Python start-up each.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.config_file import nearest_config_files
from dataset.tokenizer import build_tokenizer
from engine import build_schema, errors, load_config
from models import create_model

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo"
HINT = "--debug or ALIGNFUSE_DEBUG=1 shows the traceback"


def run_script(script: str, *args: str, debug_env: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop(errors.DEBUG_ENV, None)
    if debug_env:
        env[errors.DEBUG_ENV] = "1"
    return subprocess.run([sys.executable, str(REPO / script), *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


def the_message(returncode: int, stderr: str) -> str:
    """The one error line of a user mistake (checked: exit status 2, no traceback, exactly one error line, last)."""
    assert returncode == errors.USER_ERROR_EXIT, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if ": error: " in line]
    assert len(lines) == 1 and stderr.strip().splitlines()[-1] == lines[0], stderr[-3000:]
    assert lines[0].endswith(f"({HINT})")
    return lines[0]


def retrieval_opts(synthetic_dir: Path) -> list[str]:
    s = synthetic_dir
    return [f"model.tokenizer={s / 'vocab.txt'}", f"data.train_file=[{s / 'retrieval_train.json'}]", "data.val_file=",
            f"data.test_file={s / 'retrieval_test.json'}", f"data.image_root={s / 'images'}", "data.num_workers=0",
            "train.max_steps=1"]


def vqa_opts(synthetic_dir: Path) -> list[str]:
    s = synthetic_dir
    return [f"model.tokenizer={s / 'vocab.txt'}", f"data.train_file=[{s / 'vqa_train.json'}]",
            f"data.val_file={s / 'vqa_val.json'}", "data.test_file=", f"data.answer_list={s / 'answer_list.json'}",
            f"data.image_root={s / 'images'}", f"data.vg_root={s / 'images'}", "data.val_question_file=",
            "data.val_annotation_file=", "data.num_workers=0"]


def demo_model(task_cls: type, config: str, synthetic_dir: Path) -> torch.nn.Module:
    """The tiny model of a task with configs/demo/<config>, random weights."""
    cfg = load_config(DEMO / config, [f"model.tokenizer={synthetic_dir / 'vocab.txt'}"],
                      build_schema(task_cls.config_defaults), task_cls.open_config_keys)
    return create_model(task_cls.model_task, cfg.model, tokenizer=build_tokenizer(cfg.model.tokenizer))


# ------------------------------------------------------------------------------------------ through a subprocess
@pytest.mark.slow
def test_missing_config_names_the_nearest_and_debug_shows_the_traceback(tmp_path: Path) -> None:
    args = ["--config", "configs/demo/Retrival.yaml", "--output_dir", str(tmp_path / "out"), "--device", "cpu"]
    proc = run_script("Retrieval.py", *args)
    line = the_message(proc.returncode, proc.stderr)
    assert line.startswith("Retrieval.py: error: config file configs/demo/Retrival.yaml does not exist; nearest "
                           "config files: configs/demo/Retrieval.yaml"), line
    debug = run_script("Retrieval.py", *args, "--debug")
    assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr, debug.stderr[-3000:]
    assert "FileNotFoundError: config file configs/demo/Retrival.yaml does not exist" in debug.stderr


@pytest.mark.slow
def test_vqa_evaluate_with_a_retrieval_checkpoint_is_refused(synthetic_dir: Path, tmp_path: Path) -> None:
    """The issue's case: the answer decoder is not in a retrieval checkpoint, so evaluating VQA from it would score
    an untrained decoder (it printed val/accuracy=25.11 and exit 0)."""
    from Retrieval import RetrievalTask

    path = tmp_path / "retrieval.pth"
    torch.save({"model": demo_model(RetrievalTask, "Retrieval.yaml", synthetic_dir).state_dict()}, path)
    proc = run_script("VQA.py", "--config", str(DEMO / "VQA.yaml"), "--output_dir", str(tmp_path / "out"),
                      "--device", "cpu", "--evaluate", "--checkpoint", str(path),
                      "--opts", *vqa_opts(synthetic_dir))
    line = the_message(proc.returncode, proc.stderr)
    assert f"--evaluate with checkpoint {path}: " in line
    assert "weight tensors of AlbefVQA that the evaluation uses are not in it" in line
    assert "text_decoder.bert.* (" in line and "text_decoder.cls.* (" in line  # names the missing decoder keys
    assert "val/accuracy" not in proc.stdout


@pytest.mark.slow
def test_unrelated_checkpoint_is_refused_before_training(synthetic_dir: Path, tmp_path: Path) -> None:
    """A torch file with unrelated keys used to give 'missing keys (255)' and train from random weights."""
    path = tmp_path / "unrelated.pth"
    torch.save({"model": {f"classifier.layer{i}.weight": torch.zeros(4, 4) for i in range(20)}}, path)
    proc = run_script("Retrieval.py", "--config", str(DEMO / "Retrieval.yaml"), "--output_dir", str(tmp_path / "out"),
                      "--device", "cpu", "--checkpoint", str(path), "--opts", *retrieval_opts(synthetic_dir))
    line = the_message(proc.returncode, proc.stderr)
    assert f"checkpoint {path} does not fit AlbefRetrieval: after the key surgery (none) it fills only 0 of its" in line
    assert "20 of the file's 20 tensors have no place in the model" in line
    assert "Add --allow_partial_checkpoint to start from it anyway" in line
    assert not list((tmp_path / "out").glob("checkpoint_*.pth"))  # nothing trained


class Payload:
    """Unpickling it would create a file (open(marker, 'w')): the proof that a refused checkpoint ran nothing."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.slow
def test_hostile_checkpoint_gets_our_message_and_runs_nothing(synthetic_dir: Path, tmp_path: Path) -> None:
    marker = tmp_path / "payload_ran"
    path = tmp_path / "hostile.pth"
    torch.save({"model": {}, "extra": Payload(str(marker))}, path)
    proc = run_script("Retrieval.py", "--config", str(DEMO / "Retrieval.yaml"), "--output_dir", str(tmp_path / "out"),
                      "--device", "cpu", "--checkpoint", str(path), "--opts", *retrieval_opts(synthetic_dir))
    line = the_message(proc.returncode, proc.stderr)
    assert f"checkpoint {path} was refused: it holds the Python object " in line and "could run code" in line
    assert "re-save only its weights" in line
    assert "weights_only` set to `False`" not in proc.stderr and "will likely succeed" not in proc.stderr
    assert not marker.exists()


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_predict_device_cuda_without_cuda_says_so(tmp_path: Path) -> None:
    proc = run_script("Predict.py", "--checkpoint", str(tmp_path / "any.pth"), "--image", "x.jpg", "--text", "a cat",
                      "--device", "cuda")
    line = the_message(proc.returncode, proc.stderr)
    assert line.startswith("Predict.py: error: --device cuda: ") and "use --device cpu" in line, line
    assert ("no CUDA GPU is visible" in line) or ("built without CUDA" in line), line


# ------------------------------------------------------------------------------- the command path, in this process
def command(monkeypatch, capsys, main, argv: list[str]) -> str:
    """Run an entry script's main() as the command line would (argv from sys.argv); returns its one error line."""
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.delenv(errors.DEBUG_ENV, raising=False)
    with pytest.raises(SystemExit) as stop:
        main()
    return the_message(stop.value.code, capsys.readouterr().err)


def user_mistakes(synthetic_dir: Path, tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (Retrieval.py arguments after the shared ones, a fragment of the expected message)."""
    no_image_id = tmp_path / "no_image_id.json"
    no_image_id.write_text('[{"image": "a.jpg", "caption": "a cat"}]')
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    opts = retrieval_opts(synthetic_dir)
    return {
        "unknown key": (["--opts", *opts, "train.epoch=2"],
                        "--opts train.epoch=2: unknown config key 'train.epoch'; nearest valid keys: ['train.epochs'"),
        "bad value": (["--opts", *opts, "train.epochs=many"],
                      "config key 'train.epochs' expects int (default 1), got str 'many'"),
        "bad batch size": (["--opts", *opts, "data.batch_size=0"], "config key 'data.batch_size' must be at least 1"),
        "missing annotation file": (["--opts", *opts, f"data.train_file=[{tmp_path / 'nope.json'}]"],
                                    f"not found: {tmp_path / 'nope.json'}"),
        "missing field": (["--opts", *opts, f"data.train_file=[{no_image_id}]"],
                          f"{no_image_id}: entry 0: missing field 'image_id'"),
        "output dir not writable": (["--output_dir", str(blocker / "out"), "--opts", *opts],
                                    f"output_dir {blocker / 'out'} cannot be created or written"),
        "device cuda": (["--device", "cuda", "--opts", *opts], "device cuda (--device or the config key device): "),
    }


@pytest.mark.parametrize("mistake", ["unknown key", "bad value", "bad batch size", "missing annotation file",
                                     "missing field",
                                     "output dir not writable", "device cuda"])
def test_user_mistakes_print_one_message(mistake: str, synthetic_dir: Path, tmp_path: Path, monkeypatch,
                                         capsys) -> None:
    if mistake == "device cuda":
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the fault on any machine, GPU or not
    from Retrieval import main

    args, expected = user_mistakes(synthetic_dir, tmp_path)[mistake]
    shared = ["Retrieval.py", "--config", str(DEMO / "Retrieval.yaml"), "--output_dir", str(tmp_path / "out"),
              "--device", "cpu"]
    line = command(monkeypatch, capsys, main, shared + args)  # a later --output_dir / --device wins
    assert line.startswith("Retrieval.py: error: ") and expected in line, line


def test_debug_env_shows_the_traceback(synthetic_dir: Path, tmp_path: Path, monkeypatch) -> None:
    from Retrieval import main

    monkeypatch.setattr(sys, "argv", ["Retrieval.py", "--config", str(DEMO / "Retrieval.yaml"), "--output_dir",
                                      str(tmp_path / "out"), "--opts", *retrieval_opts(synthetic_dir), "trian.x=1"])
    monkeypatch.setenv(errors.DEBUG_ENV, "1")
    with pytest.raises(ValueError, match="unknown config key 'trian.x'"):
        main()


def test_python_calls_get_the_exception(synthetic_dir: Path, tmp_path: Path) -> None:
    """main([...]) is the Python API: errors propagate as they are, whatever the command line holds."""
    from Retrieval import main

    with pytest.raises(ValueError, match="unknown config key 'train.epoch'"):
        main(["--config", str(DEMO / "Retrieval.yaml"), "--output_dir", str(tmp_path / "out"),
              "--opts", *retrieval_opts(synthetic_dir), "train.epoch=2"])


# ------------------------------------------------------------------------------------- what counts as a user error
def _torch_error() -> None:
    torch.zeros(2).view(3)  # RuntimeError from torch


def _builtin_value_error() -> None:
    int("not a number")  # a ValueError raised inside a builtin, in our frame: a programming error


def _unpack_error() -> None:
    first, second = [1, 2, 3]  # noqa: F841


def _validation_error() -> None:
    raise ValueError("data.batch_size must be >= 1, got 0")


def _file_error() -> None:
    raise FileNotFoundError("annotation file x.json not found")


def _numpy_value_error() -> None:
    import numpy as np

    np.stack([np.zeros(2), np.zeros(3)])


@pytest.mark.parametrize("fault, user", [(_validation_error, True), (_file_error, True), (_builtin_value_error, False),
                                         (_unpack_error, False), (_numpy_value_error, False),
                                         (_torch_error, False)])
def test_only_our_own_raised_value_and_os_errors_are_user_errors(fault, user: bool, capsys) -> None:
    with pytest.raises(BaseException) as caught:
        with errors.exit_on_user_error("prog", debug=False):
            fault()
    if user:
        assert caught.type is SystemExit and caught.value.code == errors.USER_ERROR_EXIT
        assert capsys.readouterr().err.startswith("prog: error: ")
    else:  # a programming error keeps its exception (and so its traceback), and no message is printed
        assert caught.type is not SystemExit and capsys.readouterr().err == ""


def test_debug_request_by_flag_or_environment(monkeypatch) -> None:
    monkeypatch.delenv(errors.DEBUG_ENV, raising=False)
    assert not errors.debug_requested(["--config", "x.yaml"])
    assert errors.debug_requested(["--config", "x.yaml", "--debug"])
    monkeypatch.setenv(errors.DEBUG_ENV, "1")
    assert errors.debug_requested([])


def test_nearest_config_files() -> None:
    nearest = nearest_config_files(REPO / "configs" / "Retrival_coco.yaml")
    assert Path(nearest[0]).resolve() == REPO / "configs" / "Retrieval_coco.yaml", nearest
    nearest = nearest_config_files(DEMO / "vqa.yml")
    assert Path(nearest[0]).resolve() == DEMO / "VQA.yaml", nearest
    assert nearest_config_files("/nowhere/foo.yaml") == []
