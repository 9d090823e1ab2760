"""Seconds for the two-stage retrieval evaluation (encode N images and M texts, ITC ranking, ITM re-ranking of the
top k both ways), one JSON line. ``--reference-style`` also times the straightforward version that re-ranks one query
at a time recomputing the image key/values per pair (what ALBEF's loop does), on the same model and inputs.

    python benchmarks/retrieval_eval.py --size tiny --images 64 --texts 320 --k-test 16 --threads 2
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import emit, model_cfg, random_text, sync  # noqa: E402


@torch.no_grad()
def one_query_at_a_time(model, image_embeds, image_feats, text_embeds, text_masks, text_feats, k):
    """ALBEF-style loop: per query, fuse its k candidates in one pass, image tokens re-projected every time."""
    sims = image_feats @ text_feats.t()
    score_i2t = torch.full(sims.shape, -100.0)
    for i in range(sims.shape[0]):
        top = sims[i].topk(k).indices
        fused = model.fuse(text_embeds[top], text_masks[top], image_embeds[i].repeat(k, 1, 1))
        score_i2t[i, top] = model.itm_head(fused[:, 0, :])[:, 1]
    score_t2i = torch.full(sims.t().shape, -100.0)
    for t in range(sims.shape[1]):
        top = sims[:, t].topk(k).indices
        fused = model.fuse(text_embeds[t].repeat(k, 1, 1), text_masks[t].repeat(k, 1), image_embeds[top])
        score_t2i[t, top] = model.itm_head(fused[:, 0, :])[:, 1]
    return score_i2t, score_t2i


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="tiny", choices=["tiny", "base"])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--texts", type=int, default=320)
    parser.add_argument("--k-test", type=int, default=16)
    parser.add_argument("--query-batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--reference-style", action="store_true")
    args = parser.parse_args(argv)

    from models import create_model
    from models.albef import SpecialTokens
    from tasks.retrieval_eval import two_stage_scores

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
    ids, mask = (t.to(device) for t in random_text(args.texts, 30, vocab, gen))

    def encode():
        image_embeds = torch.cat([model.encode_image(images[i:i + 32]) for i in range(0, args.images, 32)])
        text_embeds = torch.cat([model.encode_text(ids[i:i + 256], mask[i:i + 256])
                                 for i in range(0, args.texts, 256)])
        return image_embeds, model.image_feat(image_embeds), text_embeds, mask, model.text_feat(text_embeds)

    record = {"benchmark": "retrieval_eval", "size": args.size, "images": args.images, "texts": args.texts,
              "k_test": args.k_test, "device": str(device), "threads": torch.get_num_threads()}
    with torch.no_grad():
        sync(device)
        start = time.perf_counter()
        encoded = encode()
        sync(device)
        record["encode_s"] = round(time.perf_counter() - start, 3)
        start = time.perf_counter()
        fast = two_stage_scores(model, *encoded, k_test=args.k_test, query_batch=args.query_batch,
                                split_across_ranks=False)
        sync(device)
        record["rerank_s"] = round(time.perf_counter() - start, 3)
        record["total_s"] = round(record["encode_s"] + record["rerank_s"], 3)
        if args.reference_style:
            start = time.perf_counter()
            slow = one_query_at_a_time(model, *encoded, k=args.k_test)
            sync(device)
            record["reference_style_rerank_s"] = round(time.perf_counter() - start, 3)
            record["reference_style_total_s"] = round(record["encode_s"] + record["reference_style_rerank_s"], 3)
            record["speedup"] = round(record["reference_style_total_s"] / record["total_s"], 2)
            diffs = [(fast[i].cpu() - slow[i]).abs().max() for i in (0, 1)]
            record["max_abs_diff"] = float(max(diffs))
    emit(record)
    return record


if __name__ == "__main__":
    main()
