"""Show, Attend and Tell (Caption.py model.arch show_attend_tell): the attention, the doubly stochastic term, scheduled
sampling, beam search against greedy decoding, the frozen encoder stages, the plateau decay and early stop of the
recipe, exact resume, 2 gloo processes against 1 for evaluation, the attention PNG, and a learning check through the
real entry point against the untrained model and the best constant caption."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import optim
import scheduler as scheduler_mod
from engine.checkpoint import load_checkpoint_file
from engine.state import RunState
from models.generation import GenerationSettings
from models.show_attend_tell import SatCfg, ShowAttendTell, WordMap, caption_losses
from tasks.caption_sat import (
    SAT_DEFAULTS,
    TILE_MIN_SIZE,
    attention_sheet,
    caption_image_file,
    load_captioner,
    write_attention,
)
from tests.test_task_vqa import free_port

REPO = Path(__file__).resolve().parents[1]
CAPTIONS = ["a red circle on the left", "a blue square in the center", "two shapes a red star and a green circle",
            "a small green triangle at the top"]
TINY = SatCfg(encoder="resnet18", pretrained=False, output_stride=16, grid=2, embed_dim=16, decoder_dim=24,
              attention_dim=12, dropout=0.0)
# The same tiny model for Caption.py (32 px images: a 2 x 2 map at output_stride 16).
TINY_OPTS = ["model.image_res=32", "model.grid=2", "model.embed_dim=32", "model.decoder_dim=64",
             "model.attention_dim=32", "data.num_workers=0", "eval.meteor=false"]


def tiny_model(cfg: SatCfg = TINY, seed: int = 0) -> ShowAttendTell:
    torch.manual_seed(seed)
    return ShowAttendTell(cfg, WordMap.build(CAPTIONS, 1))


def batch(model: ShowAttendTell, size: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """images (B, 3, 32, 32), captions (B, T) = <start> words <end> <pad>..., their mask."""
    generator = torch.Generator().manual_seed(seed)
    words = model.word_map
    texts = [CAPTIONS[i % len(CAPTIONS)] for i in range(size)]
    rows = words(texts, add_special_tokens=True)["input_ids"]
    length = max(map(len, rows))
    captions = torch.full((size, length), words.pad_token_id)
    for row, ids in enumerate(rows):
        captions[row, : len(ids)] = torch.tensor(ids)
    return torch.randn(size, 3, 32, 32, generator=generator), captions, captions != words.pad_token_id


def caption_argv(data: Path, out: Path, *opts: str) -> list[str]:
    return ["--config", str(REPO / "configs/demo/Caption_lstm.yaml"), "--output_dir", str(out), "--device", "cpu",
            "--opts", f"data.train_file=[{data / 'coco_karpathy_train.json'}]",
            f"data.val_file={data / 'coco_karpathy_val.json'}",
            f"data.val_gt_file={data / 'coco_karpathy_val_gt.json'}",
            f"data.image_root={data / 'images'}", *TINY_OPTS, *opts]


# ---- model --------------------------------------------------------------------------------------------------------


def test_word_map_round_trip_and_tokenizer_interface():
    words = WordMap.build(CAPTIONS + ["a rare word"], min_freq=2)
    assert words.words[0] == "<pad>" and words.words[-3:] == ["<unk>", "<start>", "<end>"]
    assert "rare" not in words.word_to_id and "red" in words.word_to_id  # 'red' twice, 'rare' once
    ids = words(["a red rare circle"], add_special_tokens=True)["input_ids"][0]
    assert ids[0] == words.cls_token_id and ids[-1] == words.sep_token_id and words.unk_token_id in ids
    assert words.decode(ids) == "a red circle"  # special words (<unk> too) left out of the caption
    assert WordMap.from_tensor(words.to_tensor()) == words
    with pytest.raises(ValueError, match="special words"):
        WordMap({"a": 0})


def test_the_state_dict_carries_the_word_map_through_ema_and_low_precision():
    model = tiny_model()
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)  # as train.ema_decay
    for _ in range(3):
        ema.update_parameters(model)
    assert ema.module.word_map == model.word_map
    assert WordMap.from_tensor(model.word_map_bytes.to(torch.bfloat16)) == model.word_map
    other = ShowAttendTell(TINY, WordMap.build(CAPTIONS[:1], 1))  # a smaller vocabulary, resized on set_word_map
    other.set_word_map(model.word_map)
    other.load_state_dict(model.state_dict())
    assert other.word_map == model.word_map and other.fc.out_features == len(model.word_map)


def test_attention_sums_to_one_over_the_regions_at_every_step():
    model = tiny_model().train()
    images, captions, _ = batch(model)
    logits, alphas = model(images, captions)
    assert logits.shape == (3, captions.shape[1] - 1, len(model.word_map))
    assert alphas.shape == (3, captions.shape[1] - 1, TINY.grid ** 2)
    assert (alphas >= 0).all()
    torch.testing.assert_close(alphas.sum(dim=-1), torch.ones(alphas.shape[:2]))


def test_doubly_stochastic_term_and_top5_equal_their_formulas():
    torch.manual_seed(1)
    logits, alphas = torch.randn(2, 4, 7), torch.rand(2, 4, 5).softmax(dim=-1)
    targets = torch.randint(0, 7, (2, 4))
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    losses = caption_losses(logits, alphas, targets, mask, alpha_c=0.7)
    expected = 0.0
    for b, steps in enumerate((3, 2)):  # padded steps left out of the sum over t
        covered = sum(alphas[b, t] for t in range(steps))
        expected += ((1 - covered) ** 2).sum()
    torch.testing.assert_close(losses["doubly_stochastic"], 0.7 * expected / (2 * 5))
    scored = [(b, t) for b in range(2) for t in range(4) if mask[b, t]]
    ce = sum(-logits[b, t].log_softmax(-1)[targets[b, t]] for b, t in scored) / len(scored)
    torch.testing.assert_close(losses["caption_ce"], ce)
    top5 = sum(float(targets[b, t] in logits[b, t].topk(5).indices) for b, t in scored) / len(scored)
    assert losses["top5_accuracy"].item() == pytest.approx(top5) and not losses["top5_accuracy"].requires_grad


def manual_decode(model: ShowAttendTell, images, captions, feed_truth: bool):
    """The decoder loop written out: step t is fed the true word t, or the argmax of the previous step."""
    features, proj = model.encode(images)
    state, words, out = model.init_state(features), captions[:, 0], []
    for t in range(captions.shape[1] - 1):
        if t > 0:
            words = captions[:, t] if feed_truth else out[-1].argmax(-1)
        logits, state, _ = model.step(words, state, features, proj)
        out.append(logits)
    return torch.stack(out, dim=1)


def test_scheduled_sampling_probability_one_is_teacher_forcing_and_zero_feeds_predictions():
    model = tiny_model().eval()
    images, captions, _ = batch(model)
    with torch.no_grad():
        forced = manual_decode(model, images, captions, feed_truth=True)
        free = manual_decode(model, images, captions, feed_truth=False)
        torch.testing.assert_close(model(images, captions, teacher_forcing=1.0)[0], forced)
        torch.testing.assert_close(model(images, captions, teacher_forcing=0.0)[0], free)
    assert not torch.allclose(forced, free)  # the two modes do differ on this batch


def test_beam_search_with_one_beam_equals_greedy():
    model = tiny_model(seed=3).eval()
    images, _, _ = batch(model, size=4, seed=1)
    start = torch.tensor([model.word_map.cls_token_id])
    for min_length in (0, 4):
        settings = GenerationSettings(num_beams=1, max_length=9, min_length=min_length, length_penalty=0.0)
        beam = model.generate(images, start, settings)
        greedy = model.greedy(images, start, max_length=9, min_length=min_length)
        assert torch.equal(beam, greedy), (beam, greedy)
    three = model.generate(images, start, GenerationSettings(num_beams=3, max_length=9, min_length=0))
    assert three.shape == (4, 9)


def test_frozen_stages_get_no_gradient_and_keep_their_statistics():
    model = tiny_model().train()
    images, captions, mask = batch(model)
    frozen = model.encoder.backbone.layer1[0].bn1
    running = frozen.running_mean.clone()
    logits, alphas = model(images, captions)
    losses = caption_losses(logits, alphas, captions[:, 1:], mask[:, 1:])
    (losses["caption_ce"] + losses["doubly_stochastic"]).backward()
    backbone = model.encoder.backbone
    for name in ("conv1", "bn1", "layer1"):
        assert all(p.grad is None and not p.requires_grad for p in getattr(backbone, name).parameters()), name
    for name in ("layer2", "layer3", "layer4"):  # (timm zero-initialises each block's last BN scale: some zeros)
        grads = [p.grad for p in getattr(backbone, name).parameters()]
        assert all(grad is not None for grad in grads) and sum(grad.abs().sum() for grad in grads) > 0, name
    assert torch.equal(frozen.running_mean, running)  # frozen stages stay in eval mode
    assert model.encoder.backbone.layer2[0].bn1.training
    fixed = ShowAttendTell(SatCfg(**{**TINY.__dict__, "fine_tune_encoder": False}), WordMap.build(CAPTIONS, 1))
    assert not any(p.requires_grad for p in fixed.encoder.parameters())


def test_recipe_lrs_plateau_decay_and_early_stop_fire_at_the_configured_counts():
    """The recipe's optimizer and scheduler blocks (SAT_DEFAULTS) through the engine's factories: encoder 1e-4,
    decoder 4e-4; x0.8 at the 8th and 16th evaluation without a better BLEU-4; early stop at the 20th (the
    engine's rule: patience <= evaluations without improvement)."""
    model = tiny_model()
    optimizer = optim.create_optimizer(SAT_DEFAULTS["optimizer"], model)
    sched = scheduler_mod.create_scheduler(SAT_DEFAULTS["scheduler"], optimizer, steps_per_epoch=10, epochs=100)
    names = {name: group["lr"] for group in optimizer.param_groups for name in group["param_names"]}
    assert names["encoder.backbone.layer4.0.conv1.weight"] == pytest.approx(1e-4)
    assert names["lstm.weight_ih"] == pytest.approx(4e-4)
    patience = SAT_DEFAULTS["train"]["early_stop_patience"]
    state, decays, stop_at = RunState(), [], None
    for bleu4 in [0.20] + [0.10] * 25:
        before = optimizer.param_groups[0]["lr"]
        sched.step_metric(bleu4)
        state.record_eval(bleu4, "max")
        if optimizer.param_groups[0]["lr"] < before:
            decays.append((state.evals_without_improvement, optimizer.param_groups[0]["lr"] / before))
        if stop_at is None and 0 < patience <= state.evals_without_improvement:
            stop_at = state.evals_without_improvement
    assert [count for count, _ in decays] == [8, 16, 24]
    assert all(ratio == pytest.approx(0.8) for _, ratio in decays)
    assert stop_at == 20


# ---- attention picture ----------------------------------------------------------------------------------------------


def count_tiles(sheet: np.ndarray, tile: int) -> tuple[int, int, int]:
    """(rows, columns, non-white tiles) of a sheet of square tiles."""
    rows, columns = sheet.shape[0] // tile, sheet.shape[1] // tile
    used = sum(not (sheet[r * tile:(r + 1) * tile, c * tile:(c + 1) * tile] == 255).all()
               for r in range(rows) for c in range(columns))
    return rows, columns, used


def test_attention_png_has_one_tile_per_word_after_the_image(tmp_path):
    image = np.random.default_rng(0).integers(0, 200, (32, 32, 3), dtype=np.uint8)
    words = ["a", "red", "circle", "on", "the", "left", "side"]
    alphas = np.zeros((len(words), 2, 2), dtype=np.float32)
    alphas[:, 0, 0] = 1.0  # all attention on the top-left region
    path = write_attention(tmp_path / "sheet.png", image, words, alphas, save_npy=True)
    sheet = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
    assert sheet.shape[0] % TILE_MIN_SIZE == 0 and sheet.shape[1] % TILE_MIN_SIZE == 0  # upscaled tiles
    assert count_tiles(sheet, TILE_MIN_SIZE) == (2, 6, 1 + len(words))
    tile, half = TILE_MIN_SIZE, TILE_MIN_SIZE // 2
    word_tile = sheet[:tile, 2 * tile:3 * tile].astype(float)  # 'red': hot (JET red) at the top left, under the label
    red_minus_blue = word_tile[..., 0] - word_tile[..., 2]
    assert red_minus_blue[half // 2:half, :half].mean() > red_minus_blue[half:, half:].mean() + 50
    assert np.load(tmp_path / "sheet.npy").shape == (len(words), 2, 2)
    assert json.loads((tmp_path / "sheet.json").read_text())["words"] == words
    with pytest.raises(ValueError, match="7 words but 2"):
        attention_sheet(image, words, alphas[:2])


# ---- through Caption.py ---------------------------------------------------------------------------------------------


def weights_of(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint_file(path)["model"]


@pytest.mark.slow
def test_resume_equals_an_uninterrupted_run(synthetic_dir, tmp_path):
    """Scheduled sampling (draws per word) and dropout on, so the RNG state matters; no evaluation (no val file)."""
    from Caption import main

    opts = ["data.val_file=", "data.batch_size=24", "caption.teacher_forcing=0.5", "model.dropout=0.5",
            "train.log_every_steps=100", "train.count_flops=false", "train.epochs=1"]  # 7 steps
    main(caption_argv(synthetic_dir, tmp_path / "whole", *opts))
    main(caption_argv(synthetic_dir, tmp_path / "parts", *opts, "train.max_steps=3"))
    first = weights_of(tmp_path / "parts/checkpoint_last.pth")  # stopped inside the epoch
    main(caption_argv(synthetic_dir, tmp_path / "parts", *opts) + ["--resume", "auto"])
    whole = weights_of(tmp_path / "whole/checkpoint_last.pth")
    parts = weights_of(tmp_path / "parts/checkpoint_last.pth")
    assert whole.keys() == parts.keys()
    different = [key for key in whole if not torch.equal(whole[key], parts[key])]
    assert not different, different[:5]
    assert not torch.equal(first["lstm.weight_ih"], whole["lstm.weight_ih"])  # the second part did train


@pytest.fixture(scope="module")
def trained_lstm(tmp_path_factory) -> tuple[Path, Path, dict[str, float]]:
    """(data, output folder, final metrics) of 120 steps (batch 32) of the demo config on 1,500 synthetic images
    (generated here in ~5 s), evaluated before training (the untrained baseline) and after."""
    from Caption import main
    from dataset.synthetic import generate

    data = tmp_path_factory.mktemp("synthetic_1500")
    generate(data, num_images=1500, image_size=64, seed=0)
    out = tmp_path_factory.mktemp("caption_lstm")
    metrics = main(["--config", str(REPO / "configs/demo/Caption_lstm.yaml"), "--output_dir", str(out), "--device",
                    "cpu", "--opts", f"data.train_file=[{data / 'coco_karpathy_train.json'}]",
                    f"data.val_file={data / 'coco_karpathy_val.json'}",
                    f"data.val_gt_file={data / 'coco_karpathy_val_gt.json'}", f"data.image_root={data / 'images'}",
                    "train.max_steps=120", "train.eval_every_epochs=0", "train.eval_before_training=true",
                    "train.log_every_steps=30", "train.count_flops=false", "eval.meteor=false",
                    "caption.attention_maps=3"])
    return data, out, metrics


@pytest.mark.slow
def test_learning_check_beats_the_untrained_model_and_the_best_constant_caption(trained_lstm):
    _, out, metrics = trained_lstm
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    untrained = next(r for r in records if "val/CIDEr" in r)
    trained, constant = metrics["val/CIDEr"], metrics["val/constant_CIDEr"]
    print(f"val CIDEr: trained {trained:.3f}, untrained {untrained['val/CIDEr']:.3f}, best constant caption "
          f"{constant:.3f} ({trained / constant:.2f}x)")
    assert trained > 1.25 * constant and trained > untrained["val/CIDEr"] + 0.5, (metrics, untrained)
    assert metrics["val/score"] == metrics["val/Bleu_4"]
    assert any("train/top5_accuracy" in r for r in records)
    # the attention PNGs of the first 3 val images: the image, then one tile per generated word
    results = {r["image_id"]: r["caption"] for r in json.loads((out / "caption_val_eval2.json").read_text())}
    pngs = sorted((out / "attention_val_eval2").glob("*.png"))
    assert len(pngs) == 3
    for png in pngs:
        words = results[int(png.stem)].split()
        assert count_tiles(cv2.imread(str(png)), TILE_MIN_SIZE)[2] == 1 + len(words)


@pytest.mark.slow
def test_inference_api_captions_an_image_file_as_evaluation_does(trained_lstm, tmp_path):
    """load_captioner + caption_image_file (what Predict.py calls): the checkpoint's config and word map, the same
    caption as the evaluation wrote for that image, attention maps that sum to 1, and the PNG."""
    data, out, _ = trained_lstm
    model, config = load_captioner(out / "checkpoint_last.pth")
    first = json.loads((data / "coco_karpathy_val.json").read_text())[0]
    image = cv2.cvtColor(cv2.imread(str(data / "images" / first["image"])), cv2.COLOR_BGR2RGB)
    words, alphas, pixels = caption_image_file(model, config, image)
    results = json.loads((out / "caption_val_eval2.json").read_text())
    image_id = int(Path(first["image"]).stem.split("_")[-1])
    assert " ".join(words) == next(r["caption"] for r in results if r["image_id"] == image_id)
    assert alphas.shape == (len(words), 4, 4) and np.allclose(alphas.sum(axis=(1, 2)), 1.0, atol=1e-5)
    png = write_attention(tmp_path / "one.png", pixels, words, alphas)
    assert count_tiles(cv2.imread(str(png)), TILE_MIN_SIZE)[2] == 1 + len(words)


@pytest.mark.slow
@pytest.mark.dist
def test_evaluation_on_two_gloo_processes_equals_one_process(trained_lstm, synthetic_dir, tmp_path):
    """--evaluate of the trained checkpoint on another synthetic set, without training files (the word map comes from
    the checkpoint): the same captions and metrics from 1 process and from 2 gloo processes."""
    from Caption import main

    checkpoint = trained_lstm[1] / "checkpoint_last.pth"
    opts = ["data.train_file=[]", "caption.attention_maps=0", "model.image_res=64", "model.grid=4",  # as trained
            "model.embed_dim=64", "model.decoder_dim=128", "model.attention_dim=64", "data.eval_batch_size=5"]
    one = main(caption_argv(synthetic_dir, tmp_path / "one", *opts) + ["--evaluate", "--checkpoint", str(checkpoint)])
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
               str(REPO / "Caption.py"), *caption_argv(synthetic_dir, tmp_path / "two", *opts), "--evaluate",
               "--checkpoint", str(checkpoint)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results_one = json.loads((tmp_path / "one/caption_val_eval1.json").read_text())
    results_two = json.loads((tmp_path / "two/caption_val_eval1.json").read_text())
    assert len(results_one) == 12 and results_two == results_one
    assert len({r["caption"] for r in results_one}) > 1  # captions that depend on the image
    two = [json.loads(line) for line in (tmp_path / "two/log.jsonl").read_text().splitlines() if "val/CIDEr" in line]
    assert two[-1]["val/CIDEr"] == pytest.approx(one["val/CIDEr"])


@pytest.mark.slow
def test_predict_captions_an_image_with_its_attention_sheet(trained_lstm, tmp_path, capsys):
    """Predict.py --task caption on a show_attend_tell checkpoint: the caption evaluation gave, printed, and the
    Grad-CAM-style sheet of its soft attention, with the maps as .npy."""
    from Predict import main

    data, out, _ = trained_lstm
    first = json.loads((data / "coco_karpathy_val.json").read_text())[0]
    png = tmp_path / "cap.png"
    [written] = main(["--task", "caption", "--checkpoint", str(out / "checkpoint_last.pth"), "--image",
                      str(data / "images" / first["image"]), "--out", str(png), "--save_npy"])
    image_id = int(Path(first["image"]).stem.split("_")[-1])
    caption = next(r["caption"] for r in json.loads((out / "caption_val_eval2.json").read_text())
                   if r["image_id"] == image_id)
    assert written == png and png.is_file() and repr(caption) in capsys.readouterr().out
    maps = np.load(tmp_path / "cap.npy")  # the summary (mean) map, then one per word
    assert maps.shape == (1 + len(caption.split()), 4, 4)
    np.testing.assert_allclose(maps[1:].sum(axis=(1, 2)), 1.0, atol=1e-5)
