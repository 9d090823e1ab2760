"""--checkpoint must fit the model (engine.checkpoint.check_fit, tasks.base.load_task_checkpoint): the official ALBEF
layouts load through their documented key surgery and say so in one line; a checkpoint that fills under half of
the model, or under --evaluate leaves a weight the evaluation uses unfilled, is refused unless
--allow_partial_checkpoint; a tensor of another shape is a clear error."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.checkpoint import MIN_FILLED_SHARE
from models import create_model
from tasks.base import load_task_checkpoint
from tests.conftest import load_reference
from tests.parity_utils import reference_model_cfg, reference_special
from tests.test_models import SPECIAL, tiny_cfg
from tests.test_user_errors import DEMO, demo_model, retrieval_opts

REFERENCE_TASKS = {"pretrain": "pretrain_micro.pt", "retrieval": "retrieval_micro.pt", "vqa": "vqa_micro.pt",
                   "nlvr": "nlvr_micro.pt", "ve": "ve_micro.pt"}


def saved(state: dict, path: Path) -> Path:
    torch.save({"model": state}, path)
    return path


# -------------------------------------------------------------------------------- official layouts (reference files)
@pytest.mark.parametrize("task", sorted(REFERENCE_TASKS))
def test_official_checkpoint_loads_whole_for_evaluation(task: str, reference_dir: Path, tmp_path: Path) -> None:
    """Each reference state_dict (official key names) fills its own task model completely: --evaluate accepts it."""
    ref = load_reference(reference_dir, REFERENCE_TASKS[task])
    model = create_model(task, reference_model_cfg(ref, tmp_path), special=reference_special(ref))
    load_task_checkpoint(model, saved(ref["state_dict"], tmp_path / "official.pth"), evaluate=True)
    for key, value in model.state_dict().items():
        if key in ref["state_dict"]:
            assert torch.equal(value, ref["state_dict"][key]), key


@pytest.mark.parametrize("task, evaluate", [("retrieval", True), ("vqa", True), ("ve", False), ("nlvr", False),
                                            ("nlvr_pretrain", False), ("grounding", True), ("caption", True)])
def test_pretraining_checkpoint_feeds_every_task_through_its_surgery(task: str, evaluate: bool, reference_dir: Path,
                                                                     tmp_path: Path) -> None:
    """ALBEF.pth's layout (the pretraining reference) starts every task. Tasks whose weights it fills entirely (new
    heads: none) may even evaluate from it (zero-shot retrieval / grounding, VQA's decoder and the captioner from
    the fusion layers); VE and NLVR add a head, which --evaluate refuses (see the test below)."""
    ref = load_reference(reference_dir, "pretrain_micro.pt")
    model = create_model(task, reference_model_cfg(ref, tmp_path), special=reference_special(ref))
    load_task_checkpoint(model, saved(ref["state_dict"], tmp_path / "ALBEF.pth"), evaluate=evaluate)
    if hasattr(model, "visual_encoder_m"):  # momentum copies start from the loaded weights
        assert torch.equal(model.visual_encoder_m.pos_embed, ref["state_dict"]["visual_encoder.pos_embed"])


def test_new_head_is_refused_under_evaluate_only(tmp_path: Path) -> None:
    pretrain = create_model("pretrain", tiny_cfg(tmp_path), special=SPECIAL).state_dict()
    path = saved(pretrain, tmp_path / "pre.pth")
    load_task_checkpoint(create_model("ve", tiny_cfg(tmp_path), special=SPECIAL), path)  # fine-tuning: a new head
    with pytest.raises(ValueError, match=r"--evaluate with checkpoint .*pre.pth: 4 weight tensors of AlbefVE that "
                                         r"the evaluation uses are not in it \(cls_head.\* \(4\)"):
        load_task_checkpoint(create_model("ve", tiny_cfg(tmp_path), special=SPECIAL), path, evaluate=True)
    load_task_checkpoint(create_model("ve", tiny_cfg(tmp_path), special=SPECIAL), path, evaluate=True,
                         allow_partial=True)


def test_under_half_is_refused_unless_partial_is_allowed(tmp_path: Path) -> None:
    model = create_model("retrieval", tiny_cfg(tmp_path), special=SPECIAL)
    vision_only = {k: v for k, v in model.state_dict().items() if k.startswith("visual_encoder.")}
    share = sum(v.numel() for v in vision_only.values()) / sum(p.numel() for n, p in model.named_parameters()
                                                                 if not n.endswith("_m") and "_m." not in n)
    assert share < MIN_FILLED_SHARE  # the test's premise
    path = saved({k: v + 1 for k, v in vision_only.items()}, tmp_path / "vision.pth")
    fresh = create_model("retrieval", tiny_cfg(tmp_path), special=SPECIAL)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(ValueError, match=r"does not fit AlbefRetrieval: .* fills only 18 of its 98 weight tensors "
                                         r"\(\d+\.\d% of the parameters, at least 50% needed\)"):
        load_task_checkpoint(fresh, path)
    load_task_checkpoint(fresh, path, allow_partial=True)
    assert torch.equal(fresh.visual_encoder.cls_token, vision_only["visual_encoder.cls_token"] + 1)
    assert torch.equal(fresh.text_proj.weight, before["text_proj.weight"])  # the rest keeps its initialisation


def test_tensor_of_another_shape_is_a_clear_error(tmp_path: Path) -> None:
    small = create_model("retrieval", tiny_cfg(tmp_path, embed_dim=16), special=SPECIAL).state_dict()
    with pytest.raises(ValueError, match=r"checkpoint .*small.pth does not fit AlbefRetrieval: \d+ tensors have "
                                         r"another shape than the model's \(checkpoint vs model: vision_proj.weight"):
        load_task_checkpoint(create_model("retrieval", tiny_cfg(tmp_path, embed_dim=32), special=SPECIAL),
                             saved(small, tmp_path / "small.pth"))


# ------------------------------------------------------------------------------------------- through Retrieval.py
def test_loaded_checkpoint_is_one_line_and_expected_absent_keys_are_no_warning(synthetic_dir: Path,
                                                                                 tmp_path: Path) -> None:
    """Retrieval.py --evaluate from a pretraining checkpoint (zero-shot): one line names the file, the tensors and
    the surgery; the absent idx_queue and the unused MLM head are no warning (the demo printed a bare
    "missing keys (1): ['idx_queue']")."""
    from Pretrain import PretrainTask
    from Retrieval import main

    path = saved(demo_model(PretrainTask, "Pretrain.yaml", synthetic_dir).state_dict(), tmp_path / "pre.pth")
    out = tmp_path / "zero_shot"
    main(["--config", str(DEMO / "Retrieval.yaml"), "--output_dir", str(out), "--device", "cpu", "--evaluate",
          "--checkpoint", str(path), "--opts", *retrieval_opts(synthetic_dir)])
    log = (out / "log.txt").read_text().splitlines()
    loaded = [line for line in log if f"loaded {path} into AlbefRetrieval: " in line]
    assert len(loaded) == 1, log
    assert " of the parameters) from its " in loaded[0] and "(100.0% of the parameters)" in loaded[0]
    assert "key surgery: text_encoder.bert.* -> text_encoder.* (" in loaded[0]
    assert "unused: text_encoder.cls.* (" in loaded[0]
    warnings = [line for line in log if " WARNING " in line]
    assert not [line for line in warnings if "missing" in line or "idx_queue" in line], warnings
