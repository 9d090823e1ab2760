"""Prefix captioning (Caption.py, model.arch prefix_lm; ViECap-style): noise injection, entities and their masking,
caption-only loss, transformers' generate against a greedy loop of our own, the caption feature cache, resume,
2 gloo processes against 1, both feature sources, training without images, and the learning check on the session's
demo pretraining (held-out CIDEr against the untrained model and the best constant caption)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import engine
from dataset.prefix_text import (
    IGNORE_INDEX,
    EntityMatcher,
    PrefixCollator,
    PrefixTextDataset,
    hard_prompt,
    load_lm_tokenizer,
    prompt_sequences,
)
from engine import checkpoint as ckpt
from models.generation import GenerationSettings
from models.prefix_caption import PrefixCaptioner, PrefixCfg, build_language_model
from tests.prefix_helpers import REPO, prefix_argv, random_albef_checkpoint, tiny_open_clip
from tests.test_task_vqa import free_port


def tiny_captioner(synthetic_dir: Path, noise_variance: float = 0.016, seed: int = 0):
    tokenizer = load_lm_tokenizer(str(synthetic_dir / "lm_tokenizer"))
    torch.manual_seed(seed)
    lm = build_language_model("", {"n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 96}, len(tokenizer),
                              tokenizer.eos_token_id)
    cfg = PrefixCfg(feature_dim=16, prefix_length=4, mapping_layers=2, mapping_heads=2, noise_variance=noise_variance)
    return PrefixCaptioner(cfg, lm), tokenizer


@pytest.mark.parametrize("variance", [0.016, 0.05])
def test_noise_has_the_configured_variance_in_training_only(synthetic_dir, variance):
    model, _ = tiny_captioner(synthetic_dir, noise_variance=variance)
    feature = F.normalize(torch.randn(4000, 16), dim=-1)
    noise = model.train().add_noise(feature) - feature
    assert abs(noise.var().item() - variance) < 0.03 * variance  # 64,000 draws: the std error is ~0.6%
    assert abs(noise.mean().item()) < 0.01
    assert torch.equal(model.eval().add_noise(feature), feature)


def test_entities_are_found_and_masked_at_the_configured_rate():
    match = EntityMatcher(["circle", "red", "traffic light", "light", "box"])
    assert match("Two red circles, a traffic light and a red box.") == ["red", "circle", "traffic light", "box"]
    assert match("a green square") == []
    assert hard_prompt(["cat", "dog"]) == "There are cat, dog in the image."
    entities = [["a", "b", "c", "d", "e"]] * 400
    dataset = PrefixTextDataset(["x"] * 400, torch.zeros(400, 2), entities, 0.4, seed=3)
    kept = [len(dataset[(index, epoch)]["entities"]) for index in range(400) for epoch in range(5)]
    masked_share = 1 - np.sum(kept) / (5 * len(kept))
    assert abs(masked_share - 0.4) < 0.02, masked_share  # 10,000 draws: the std error is 0.005
    assert dataset[(7, 1)]["entities"] == dataset[(7, 1)]["entities"]  # seeded by (seed, epoch, index): resumable
    assert any(dataset[(7, epoch)]["entities"] != dataset[(7, 0)]["entities"] for epoch in range(1, 6))
    assert PrefixTextDataset(["x"], torch.zeros(1, 2), [["a", "b"]], 0.0, seed=0)[0]["entities"] == ["a", "b"]


def test_cross_domain_split_holds_combinations_never_seen_together_in_training(synthetic_dir):
    from dataset.synthetic import CROSS_DOMAIN_PAIR

    train = json.loads((synthetic_dir / "coco_karpathy_train_indomain.json").read_text())
    full = json.loads((synthetic_dir / "coco_karpathy_train.json").read_text())
    nocaps = json.loads((synthetic_dir / "coco_karpathy_nocaps.json").read_text())
    gt = json.loads((synthetic_dir / "coco_karpathy_nocaps_gt.json").read_text())
    match = EntityMatcher(list(CROSS_DOMAIN_PAIR))
    assert 0 < len(train) < len(full) and {e["image"] for e in train} <= {e["image"] for e in full}
    assert not any(len(match(entry["caption"])) == 2 for entry in train)
    assert any(len(match(entry["caption"])) == 2 for entry in full)  # the pair does occur in the full training set
    # every cross-domain image holds both (its references name both here; seed 0 of the generator)
    assert nocaps and all(set(CROSS_DOMAIN_PAIR) <= {e for c in entry["caption"] for e in match(c)} for entry in nocaps)
    assert not {e["image"] for e in nocaps} & {e["image"] for e in full}  # held-out images
    assert sorted(image["file_name"] for image in gt["images"]) == sorted(e["image"] for e in nocaps)
    assert (synthetic_dir / "entities.txt").read_text().split() == ["circle", "square", "triangle", "star", "cross",
                                                                      "red", "green", "blue", "yellow", "purple",
                                                                      "orange"]


@pytest.mark.parametrize("soft_prompt_first", [True, False])
def test_loss_scores_the_caption_and_not_the_prompts(synthetic_dir, soft_prompt_first):
    model, tokenizer = tiny_captioner(synthetic_dir, noise_variance=0.0)
    items = [{"feature": torch.randn(16), "caption": "a red circle on the left", "index": 0,
              "entities": ["red", "circle"]},
             {"feature": torch.randn(16), "caption": "two shapes", "index": 1, "entities": []}]
    batch = PrefixCollator(tokenizer, 4, 30, soft_prompt_first)(items)
    ids, mask, labels = batch["token_ids"], batch["attention_mask"], batch["labels"]
    prompt = tokenizer(hard_prompt(["red", "circle"]), add_special_tokens=False)["input_ids"]
    caption = tokenizer(" a red circle on the left", add_special_tokens=False)["input_ids"]
    first = [-1] * 4 + prompt if soft_prompt_first else prompt + [-1] * 4
    assert ids[0, : len(first) + len(caption) + 1].tolist() == first + caption + [tokenizer.eos_token_id]
    assert (labels[0, : len(first)] == IGNORE_INDEX).all()
    assert labels[0, len(first) :].tolist() == caption + [tokenizer.eos_token_id] + [IGNORE_INDEX] * (
        ids.shape[1] - len(first) - len(caption) - 1)
    model.eval()
    with torch.no_grad():
        loss = model(batch["feature"], ids, mask, labels)["loss_caption"]
        embeds = model.embed(batch["feature"], ids)
        logits = model.language_model(inputs_embeds=embeds, attention_mask=mask,
                                      position_ids=model.position_ids(mask)).logits
    terms = [F.cross_entropy(logits[b, t - 1][None], ids[b, t][None]) for b in range(2) for t in range(1, ids.shape[1])
             if labels[b, t] != IGNORE_INDEX]
    assert len(terms) == int((labels != IGNORE_INDEX).sum())
    torch.testing.assert_close(loss, torch.stack(terms).mean())


def test_generate_with_one_beam_equals_a_greedy_loop(synthetic_dir):
    """transformers' generate (left-padded prompts of different lengths, one batch) against argmax decoding of each
    prompt alone, recomputing the whole sequence every step."""
    model, tokenizer = tiny_captioner(synthetic_dir, seed=1)
    model.eval()
    eos = tokenizer.eos_token_id
    torch.manual_seed(2)
    feature = F.normalize(torch.randn(3, 16), dim=-1)
    prompts = [hard_prompt(["red", "circle", "star"]), hard_prompt([]), hard_prompt(["blue"])]
    rows = prompt_sequences(tokenizer, 4, prompts, None, 0, pad_left=True)
    settings = GenerationSettings(num_beams=1, max_length=10, min_length=0)
    generated = model.generate(feature, rows["token_ids"], rows["attention_mask"], settings, eos)
    assert generated.shape == (3, 10)
    with torch.no_grad():
        for b in range(3):
            alone = prompt_sequences(tokenizer, 4, [prompts[b]], None, 0)["token_ids"]
            embeds = model.embed(feature[b : b + 1], alone)
            tokens: list[int] = []
            while len(tokens) < settings.max_length:
                token = int(model.language_model(inputs_embeds=embeds).logits[0, -1].argmax())
                tokens.append(token)
                if token == eos:
                    break
                embeds = torch.cat([embeds, model.language_model.get_input_embeddings()(torch.tensor([[token]]))], 1)
            expected = tokens + [eos] * (settings.max_length - len(tokens))
            assert generated[b].tolist() == expected, (b, generated[b].tolist(), expected)
    # beams and sampling go through the same call and keep the shape contract
    beams = model.generate(feature, rows["token_ids"], rows["attention_mask"],
                           GenerationSettings(num_beams=3, num_return_sequences=2, max_length=6, min_length=2), eos)
    assert beams.shape == (6, 6) and (beams[:, :2] != eos).all()


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_feature_cache_is_reused_training_reads_no_image_and_folder_captioning(synthetic_dir, tmp_path, monkeypatch):
    """Two training runs into different folders sharing prefix.feature_cache_dir (open_clip source): the second
    encodes no caption. Every image decoder fails while they train: the captioner learns from captions alone. Then
    the trained checkpoint captions a folder of images (decoders restored)."""
    from Caption import main
    from models.prefix_caption import OpenClipFeatures

    def no_image(*args, **kwargs):
        raise AssertionError("an image was read while training the prefix captioner")

    import cv2

    import dataset.datasets
    import dataset.transforms
    encoded: list[int] = []
    original = OpenClipFeatures.encode_text
    monkeypatch.setattr(OpenClipFeatures, "encode_text", lambda self, texts: encoded.append(len(texts)) or
                        original(self, texts))
    for module, name in ((cv2, "imread"), (cv2, "imdecode"), (dataset.transforms, "load_image"),
                         (dataset.datasets, "load_image")):
        if hasattr(module, name):
            monkeypatch.setattr(module, name, no_image)
    cache = tmp_path / "cache"
    source = tiny_open_clip(tmp_path)
    quick = ["train.epochs=1", "train.max_steps=2", "data.batch_size=8", "data.val_file=",
             f"prefix.feature_cache_dir={cache}", "prefix.feature_batch_size=64"]
    main(prefix_argv(synthetic_dir, tmp_path / "a", *source, *quick))
    num_captions = len(json.loads((synthetic_dir / "coco_karpathy_train.json").read_text()))
    assert sum(encoded) == num_captions and len(encoded) == -(-num_captions // 64)
    files = list(cache.glob("caption_features_*.safetensors"))
    assert len(files) == 1
    from safetensors.torch import load_file
    features = load_file(str(files[0]))["features"]
    assert features.shape[0] == num_captions
    torch.testing.assert_close(features.norm(dim=-1), torch.ones(num_captions))
    encoded.clear()
    main(prefix_argv(synthetic_dir, tmp_path / "b", *source, *quick))
    assert encoded == []  # reused
    main(prefix_argv(synthetic_dir, tmp_path / "c", *source, *quick, train="coco_karpathy_train_indomain"))
    assert sum(encoded) == len(json.loads((synthetic_dir / "coco_karpathy_train_indomain.json").read_text()))
    assert len(list(cache.glob("caption_features_*.safetensors"))) == 2  # other captions, another file

    monkeypatch.undo()
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in sorted(os.listdir(synthetic_dir / "images"))[:3]:
        (folder / name).write_bytes((synthetic_dir / "images" / name).read_bytes())
    metrics = main(prefix_argv(synthetic_dir, tmp_path / "folder", *source, f"data.image_folder={folder}",
                               "generation.sample=true", "generation.max_length=6")
                   + ["--evaluate", "--checkpoint", str(tmp_path / "a" / "checkpoint_last.pth")])
    assert metrics == {"folder/num_images": 3.0}
    captions = json.loads((tmp_path / "folder" / "captions_folder.json").read_text())
    assert sorted(c["image"] for c in captions) == sorted(os.listdir(folder))


def weights(trainer: engine.Trainer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in trainer.model.parameters()]


def run_in_process(argv: list[str]) -> engine.Trainer:
    from tasks.caption_prefix import PrefixCaptionTask

    trainer = engine.build_trainer(PrefixCaptionTask, argv)
    try:
        trainer.fit()
    finally:
        trainer.close()
    return trainer


@pytest.mark.slow
def test_resume_mid_epoch_equals_uninterrupted(synthetic_dir, tmp_path):
    """Noise draws (torch's RNG) and entity masks (seeded by epoch and index) continue where they stopped."""
    source = tiny_open_clip(tmp_path)
    opts = ["train.epochs=2", "data.batch_size=32", "data.val_file=", "train.ckpt_every_steps=2",
            "train.keep_last_ckpts=20", "scheduler.name=cosine", "scheduler.warmup_steps=3"]
    straight = run_in_process(prefix_argv(synthetic_dir, tmp_path / "a", *source, *opts))
    mid = tmp_path / "a" / ckpt.rolling_name(2)
    state = ckpt.load_checkpoint_file(mid)
    assert (state["epoch"], state["step"]) == (0, 2) and straight.step == 10  # 168 captions: 5 steps an epoch
    resumed = run_in_process(prefix_argv(synthetic_dir, tmp_path / "b", *source, *opts) + ["--resume", str(mid)])
    assert resumed.step == straight.step
    for a, b in zip(weights(straight), weights(resumed), strict=True):
        assert torch.equal(a, b), (a - b).abs().max()


@pytest.mark.slow
@pytest.mark.dist
def test_evaluation_on_two_gloo_processes_equals_one(synthetic_dir, tmp_path):
    """The alignfuse source (a random tiny ALBEF checkpoint) and a random captioner from a checkpoint, evaluated with
    beam search and entity prompts on 1 and on 2 processes: the same captions and metrics."""
    from Caption import main
    from engine.config import build_schema, load_config
    from tasks.caption_prefix import PrefixCaptionTask

    source = random_albef_checkpoint(synthetic_dir, tmp_path / "albef.pth")
    argv = prefix_argv(synthetic_dir, tmp_path / "unused", *source)
    schema = build_schema(PrefixCaptionTask.config_defaults)
    config = load_config(argv[1], argv[argv.index("--opts") + 1 :], schema, PrefixCaptionTask.open_config_keys)
    torch.manual_seed(0)
    model = PrefixCaptionTask(config, torch.device("cpu")).build_model()
    torch.save({"model": model.state_dict()}, tmp_path / "captioner.pth")
    evaluate = ["--evaluate", "--checkpoint", str(tmp_path / "captioner.pth")]
    quick = ["generation.max_length=8", "generation.num_beams=2", "data.eval_batch_size=4"]
    one = main(prefix_argv(synthetic_dir, tmp_path / "one", *source, *quick) + evaluate)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
               str(REPO / "Caption.py"), *prefix_argv(synthetic_dir, tmp_path / "two", *source, *quick), *evaluate]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    captions_one = json.loads((tmp_path / "one" / "caption_val_eval1.json").read_text())
    captions_two = json.loads((tmp_path / "two" / "caption_val_eval1.json").read_text())
    gt = json.loads((synthetic_dir / "coco_karpathy_val_gt.json").read_text())
    assert [c["image_id"] for c in captions_one] == sorted(image["id"] for image in gt["images"])
    assert captions_two == captions_one
    two = next(r for r in reversed(read_log(tmp_path / "two")) if "val/CIDEr" in r)
    assert two["val/CIDEr"] == pytest.approx(one["val/CIDEr"])


def test_bad_settings_are_clear_errors(synthetic_dir, tmp_path):
    from Caption import main

    with pytest.raises(ValueError, match="prefix.feature_checkpoint is empty"):
        main(prefix_argv(synthetic_dir, tmp_path / "a", "prefix.feature_checkpoint=", "data.val_file="))
    with pytest.raises(ValueError, match="prefix.feature_source"):
        main(prefix_argv(synthetic_dir, tmp_path / "b", "prefix.feature_source=clip"))
    with pytest.raises(FileNotFoundError, match="entity vocabulary"):
        main(prefix_argv(synthetic_dir, tmp_path / "c", f"prefix.entity_vocabulary={tmp_path / 'none.txt'}"))
    with pytest.raises(ValueError, match="model.image_res"):
        main(prefix_argv(synthetic_dir, tmp_path / "d", *tiny_open_clip(tmp_path), "model.image_res=48"))


@pytest.mark.slow
def test_prefix_captioner_learns_from_captions_alone(pretrained_demo, tmp_path, capsys):
    """The demo config (2-layer GPT-2 of width 64) trained 3 epochs on the 3,150 training captions of the session's
    synthetic data, its features from the ITC space of the session's demo pretraining; held-out CIDEr on the 225 val
    images against the untrained model and the best constant caption, with and without entity prompts."""
    from Caption import main

    data = pretrained_demo.data
    common = [f"prefix.feature_checkpoint={pretrained_demo.checkpoint}", f"prefix.feature_cache_dir={tmp_path}",
              "train.epochs=3", "train.eval_every_epochs=3"]
    with_entities = main(prefix_argv(data, tmp_path / "entities", *common, "train.eval_before_training=true",
                                     tiny=False))
    untrained = next(r for r in read_log(tmp_path / "entities") if "val/CIDEr" in r)
    without = main(prefix_argv(data, tmp_path / "plain", *common, "prefix.entity_vocabulary=",
                               "eval.constant_caption_candidates=0", tiny=False))  # the same constant: not again
    constant = with_entities["val/constant_CIDEr"]
    with capsys.disabled():
        print(f"\nprefix captioner, val CIDEr on {len(json.loads((data / 'coco_karpathy_val.json').read_text()))} "
              f"held-out images: untrained {untrained['val/CIDEr']:.3f} | best constant caption {constant:.3f} | "
              f"trained with entity prompts {with_entities['val/CIDEr']:.3f} | without {without['val/CIDEr']:.3f}")
    for trained in (with_entities, without):
        assert trained["val/CIDEr"] > 1.15 * constant, (trained, constant)
        assert trained["val/CIDEr"] > untrained["val/CIDEr"] + 0.5, (trained, untrained)
