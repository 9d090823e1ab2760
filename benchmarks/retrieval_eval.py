"""Seconds for the two-stage retrieval evaluation (encode N images and M texts, ITC ranking, ITM re-ranking of the
top k both ways), one JSON line. ``--reference-style`` also times the straightforward version, what ALBEF's
evaluation does, on the same model, images and captions: texts encoded padded to 30 tokens, then one query at a time,
its k candidates fused in one pass with the image tokens' key/values re-projected for every pair.

Captions are random token ids whose lengths follow ``--caption-words MIN-MAX`` (uniform, one token per word, plus
[CLS]; padded to 30 tokens). The default 6-16 (mean 11 words) is COCO-like: COCO captions average ~10.5 words, most
between 8 and 15, few beyond 20. ``--caption-words 29-29`` gives every text the full 30 tokens.

    python benchmarks/retrieval_eval.py --size tiny --images 64 --texts 320 --k-test 16 --threads 2 --reference-style
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import emit, model_cfg, random_text, sync  # noqa: E402

MAX_TOKENS = 30  # ALBEF's evaluation pads every text to 30 tokens


@torch.no_grad()
def one_query_at_a_time(model, image_embeds, image_feats, text_embeds, text_masks, text_feats, k):
    """ALBEF-style loop: per query, fuse its k candidates in one pass at the full padded length, image tokens
    re-projected every time."""
    sims = image_feats @ text_feats.t()
    score_i2t = torch.full(sims.shape, -100.0)
    for i in range(sims.shape[0]):
        top = sims[i].topk(k).indices
        fused = model.fuse(text_embeds[top], text_masks[top], image_embeds[i].repeat(k, 1, 1))
        score_i2t[i, top] = model.itm_head(fused[:, 0, :])[:, 1].cpu()
    score_t2i = torch.full(sims.t().shape, -100.0)
    for t in range(sims.shape[1]):
        top = sims[:, t].topk(k).indices
        fused = model.fuse(text_embeds[t].repeat(k, 1, 1), text_masks[t].repeat(k, 1), image_embeds[top])
        score_t2i[t, top] = model.itm_head(fused[:, 0, :])[:, 1].cpu()
    return score_i2t, score_t2i


def caption_words(spec: str) -> tuple[int, int]:
    """'MIN-MAX' (or 'N') words per caption, within what 30 tokens with [CLS] hold."""
    low, _, high = spec.partition("-")
    try:
        bounds = int(low), int(high or low)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--caption-words expects MIN-MAX, e.g. 6-16, got {spec!r}") from None
    if not 1 <= bounds[0] <= bounds[1] <= MAX_TOKENS - 1:
        raise argparse.ArgumentTypeError(f"--caption-words needs 1 <= MIN <= MAX <= {MAX_TOKENS - 1}, got {spec!r}")
    return bounds


def random_captions(count: int, words: tuple[int, int], vocab: int, generator: torch.Generator
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) (count, 30): [CLS] + a uniform MIN..MAX number of random word tokens, right-padded with 0."""
    ids, _ = random_text(count, MAX_TOKENS, vocab, generator)
    lengths = 1 + torch.randint(words[0], words[1] + 1, (count,), generator=generator)  # (count,) with [CLS]
    mask = (torch.arange(MAX_TOKENS)[None, :] < lengths[:, None]).long()
    return ids * mask, mask


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="tiny", choices=["tiny", "base"])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--texts", type=int, default=320)
    parser.add_argument("--k-test", type=int, default=16)
    parser.add_argument("--caption-words", type=caption_words, default=(6, 16), metavar="MIN-MAX")
    parser.add_argument("--query-batch", type=int, default=16, help="a fusion pass scores query_batch * k pairs")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--amp", default="none", choices=["none", "bf16"], help="autocast, as the engine evaluates")
    parser.add_argument("--no-cudnn-sdpa", action="store_true",
                        help="attention through flash / memory-efficient / math kernels only (cuDNN's left out)")
    parser.add_argument("--reference-style", action="store_true")
    parser.add_argument("--count-flops", action="store_true",
                        help="re-run the re-ranking (both ways with --reference-style) under FlopCounterMode")
    args = parser.parse_args(argv)

    from models import create_model
    from models.albef import SpecialTokens
    from tasks.retrieval_eval import encode_text_ids, two_stage_scores

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = model_cfg(args.size)
    vocab = 30522 if args.size == "base" else 1000
    special = SpecialTokens() if args.size == "base" else SpecialTokens(pad=0, cls=2, sep=3, mask=4, vocab_size=vocab)
    torch.manual_seed(0)
    model = create_model("retrieval", cfg, special=special).to(device).eval()
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(args.images, 3, cfg["image_res"], cfg["image_res"], generator=gen).to(device)
    ids, mask = (t.to(device) for t in random_captions(args.texts, args.caption_words, vocab, gen))

    def timed(fn):
        sync(device)
        start = time.perf_counter()
        result = fn()
        sync(device)
        return result, round(time.perf_counter() - start, 3)

    def encode_images():
        return torch.cat([model.encode_image(images[i:i + 32]) for i in range(0, args.images, 32)])

    def encode_texts_padded():  # ALBEF: every text at the full 30 tokens
        return torch.cat([model.encode_text(ids[i:i + 256], mask[i:i + 256]) for i in range(0, args.texts, 256)])

    record = {"benchmark": "retrieval_eval", "size": args.size, "images": args.images, "texts": args.texts,
              "k_test": args.k_test, "caption_words": "{}-{}".format(*args.caption_words),
              "mean_tokens": round(float(mask.sum(1).float().mean()), 2), "query_batch": args.query_batch,
              "device": str(device), "amp": args.amp, "threads": torch.get_num_threads()}
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp == "bf16")
    record["no_cudnn_sdpa"] = args.no_cudnn_sdpa
    kernels = contextlib.nullcontext()
    if args.no_cudnn_sdpa:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        kernels = sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])
    with torch.no_grad(), autocast, kernels:
        image_embeds, record["encode_images_s"] = timed(encode_images)
        image_feats = model.image_feat(image_embeds)
        (text_embeds, text_feats), record["encode_texts_s"] = timed(lambda: encode_text_ids(model, ids, mask))
        ours_inputs = (image_embeds, image_feats, text_embeds, mask, text_feats)
        fast, record["rerank_s"] = timed(lambda: two_stage_scores(model, *ours_inputs, k_test=args.k_test,
                                                                  query_batch=args.query_batch,
                                                                  split_across_ranks=False))
        record["total_s"] = round(record["encode_images_s"] + record["encode_texts_s"] + record["rerank_s"], 3)
        if args.reference_style:
            padded_embeds, record["reference_style_encode_texts_s"] = timed(encode_texts_padded)
            padded_feats = model.text_feat(padded_embeds)
            reference_inputs = (image_embeds, image_feats, padded_embeds, mask, padded_feats)
            slow, record["reference_style_rerank_s"] = timed(
                lambda: one_query_at_a_time(model, *reference_inputs, k=args.k_test))
            record["reference_style_total_s"] = round(record["encode_images_s"]
                                                      + record["reference_style_encode_texts_s"]
                                                      + record["reference_style_rerank_s"], 3)
            record["speedup"] = round(record["reference_style_total_s"] / record["total_s"], 2)
            record["rerank_speedup"] = round(record["reference_style_rerank_s"] / record["rerank_s"], 2)
            # Same candidates both ways (the two text encodings agree to rounding), and the same scores.
            scored = [(fast[i].cpu() != -100.0) for i in (0, 1)]
            record["same_candidates"] = all(torch.equal(scored[i], slow[i] != -100.0) for i in (0, 1))
            record["max_abs_diff"] = float(max((fast[i].cpu() - slow[i]).abs().max() for i in (0, 1)))
        if args.count_flops:
            from torch.utils.flop_counter import FlopCounterMode

            counter = FlopCounterMode(display=False)
            with counter:
                two_stage_scores(model, *ours_inputs, k_test=args.k_test, query_batch=args.query_batch,
                                 split_across_ranks=False)
            record["rerank_gflop"] = round(counter.get_total_flops() / 1e9, 1)
            if args.reference_style:
                counter = FlopCounterMode(display=False)
                with counter:
                    one_query_at_a_time(model, *reference_inputs, k=args.k_test)
                record["reference_style_rerank_gflop"] = round(counter.get_total_flops() / 1e9, 1)
    emit(record)
    return record


if __name__ == "__main__":
    main()
