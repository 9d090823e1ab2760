"""Captioning: the loss scores only the caption (not the prompt), pretrained weights feed the decoder, and Caption.py
trains, evaluates (COCO metrics, result file with image ids) and captions a folder through its real entry point, on
1 process and on 2 gloo processes, beating a constant caption after a short run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from models import create_model, load_checkpoint
from tests.test_models import SPECIAL, tiny_cfg
from tests.test_task_vqa import TINY_MODEL, free_port

REPO = Path(__file__).resolve().parents[1]


def caption_argv(data: Path, out: Path, *opts: str) -> list[str]:
    return ["--config", str(REPO / "configs/demo/Caption.yaml"), "--output_dir", str(out), "--device", "cpu",
            "--opts", f"model.tokenizer={data / 'vocab.txt'}",
            f"data.train_file=[{data / 'coco_karpathy_train.json'}]",
            f"data.val_file={data / 'coco_karpathy_val.json'}",
            f"data.val_gt_file={data / 'coco_karpathy_val_gt.json'}",
            f"data.image_root={data / 'images'}", "data.num_workers=0", "scheduler.warmup_steps=2",
            "eval.meteor=false", *TINY_MODEL, *opts]


def test_loss_scores_the_caption_and_not_the_prompt(tmp_path):
    torch.manual_seed(0)
    model = create_model("caption", tiny_cfg(tmp_path), special=SPECIAL).eval()
    image = torch.randn(2, 3, 32, 32)
    ids = torch.randint(5, 60, (2, 8))
    ids[:, 0] = SPECIAL.cls
    ids[0, 6], ids[0, 7] = SPECIAL.sep, SPECIAL.pad
    ids[1, 7] = SPECIAL.sep
    mask = (ids != SPECIAL.pad).long()
    prompt_length = 3
    with torch.no_grad():
        loss = model(image, ids, mask, prompt_length=prompt_length, label_smoothing=0.1)["loss_caption"]
        logits = model.text_decoder(ids, mask, encoder_hidden_states=model.encode_image(image))
    # Scored: positions predicting tokens prompt_length.. of each caption, its [SEP] included, padding excluded.
    terms = [F.cross_entropy(logits[b, t - 1][None], ids[b, t][None], label_smoothing=0.1)
             for b in range(2) for t in range(prompt_length, 8) if mask[b, t]]
    torch.testing.assert_close(loss, torch.stack(terms).mean())


def test_pretrained_text_encoder_initialises_every_decoder_layer(tmp_path):
    pretrain = create_model("pretrain", tiny_cfg(tmp_path), special=SPECIAL).state_dict()
    model = create_model("caption", tiny_cfg(tmp_path), special=SPECIAL)
    missing, _ = load_checkpoint(model, pretrain)
    assert missing == []
    decoder = model.text_decoder.state_dict()
    for key in ("bert.embeddings.word_embeddings.weight", "bert.encoder.layer.0.attention.self.query.weight",
                "bert.encoder.layer.2.crossattention.self.key.weight", "cls.predictions.transform.dense.weight"):
        torch.testing.assert_close(decoder[key], pretrain["text_encoder." + key])
    # layer 0 has no cross-attention in the encoder (fusion_layer 1): it borrows that of fusion layer 1
    torch.testing.assert_close(decoder["bert.encoder.layer.0.crossattention.self.value.weight"],
                               pretrain["text_encoder.bert.encoder.layer.1.crossattention.self.value.weight"])
    again = create_model("caption", tiny_cfg(tmp_path), special=SPECIAL)
    assert load_checkpoint(again, model.state_dict(), strict=True) == ([], [])  # own checkpoints load as they are


@pytest.mark.slow
def test_caption_trains_evaluates_and_captions_a_folder(synthetic_dir, tmp_path):
    """~200 optimizer steps of a tiny model (10-60 s on a shared 2-core CPU); the baseline is the untrained model,
    evaluated before the first step."""
    from Caption import main

    out = tmp_path / "caption"
    metrics = main(caption_argv(synthetic_dir, out, "train.epochs=20", "train.eval_every_epochs=20",
                                "train.eval_before_training=true", "data.batch_size=16", "optimizer.lr=2e-3"))
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    untrained = next(r for r in records if "val/CIDEr" in r)
    assert metrics["val/Bleu_1"] > untrained["val/Bleu_1"] + 0.15, (metrics, untrained)
    assert metrics["val/CIDEr"] > untrained["val/CIDEr"] + 0.1, (metrics, untrained)
    assert metrics["val/score"] == metrics["val/CIDEr"]
    assert {"val/Bleu_4", "val/ROUGE_L"} <= set(metrics) and "val/METEOR" not in metrics
    gt = json.loads((synthetic_dir / "coco_karpathy_val_gt.json").read_text())
    results = json.loads((out / "caption_val_eval2.json").read_text())
    assert sorted(r["image_id"] for r in results) == sorted(image["id"] for image in gt["images"])
    assert all(isinstance(r["caption"], str) and r["caption"] for r in results)

    # Inference: caption a folder of images (one of them unreadable) from the trained checkpoint.
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in sorted(os.listdir(synthetic_dir / "images"))[:3]:
        shutil.copy(synthetic_dir / "images" / name, folder / name)
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    predict = tmp_path / "predict"
    metrics = main(caption_argv(synthetic_dir, predict, f"data.image_folder={folder}", "generation.sample=true")
                   + ["--evaluate", "--checkpoint", str(out / "checkpoint_last.pth")])
    captions = json.loads((predict / "captions_folder.json").read_text())
    assert metrics == {"folder/num_images": 3.0}
    assert sorted(c["image"] for c in captions) == sorted(os.listdir(folder))[1:]  # broken.jpg sorts first
    assert all(c["caption"] for c in captions)


@pytest.mark.slow
@pytest.mark.dist
def test_caption_two_gloo_processes(synthetic_dir, tmp_path):
    out = tmp_path / "caption2"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
               str(REPO / "Caption.py"),
               *caption_argv(synthetic_dir, out, "train.epochs=1", "train.max_steps=3", "data.batch_size=8",
                             "generation.max_length=8")]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    gt = json.loads((synthetic_dir / "coco_karpathy_val_gt.json").read_text())
    results = json.loads((out / "caption_val_eval1.json").read_text())
    assert sorted(r["image_id"] for r in results) == sorted(image["id"] for image in gt["images"])
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert any("val/CIDEr" in r for r in records)


def test_two_evaluate_runs_into_one_folder_never_overwrite_results(synthetic_dir, tmp_path):
    """--evaluate twice into the same output folder (the second with 2 captions per image): both result files stay;
    the same weights (seeded init) give the same best caption, now first of the two."""
    from Caption import main

    out = tmp_path / "evals"
    quick = ["generation.max_length=6", "generation.num_beams=2", "generation.min_length=1"]
    main(caption_argv(synthetic_dir, out, *quick) + ["--evaluate"])
    first_text = (out / "caption_val_eval1.json").read_text()
    main(caption_argv(synthetic_dir, out, *quick, "generation.num_return_sequences=2") + ["--evaluate"])
    assert (out / "caption_val_eval1.json").read_text() == first_text
    first, second = json.loads(first_text), json.loads((out / "caption_val_eval2.json").read_text())
    assert [r["image_id"] for r in second] == [r["image_id"] for r in first]
    assert all(len(r["captions"]) == 2 and r["caption"] == r["captions"][0] for r in second)
    assert [r["caption"] for r in second] == [r["caption"] for r in first]
    assert "captions" not in first[0]
    assert not (out / "caption_val_eval3.json").exists()
