"""The first-contact demo (``bash run.sh demo``): synthetic data, a tiny ALBEF pretrained on CPU in a few minutes,
then zero-shot image-text retrieval on held-out images (ITC ranking, ITM re-ranking) next to the chance level, and
where the ITM Grad-CAM of held-out referring expressions lies (the pointing game, next to its chance level).

Writes into output/demo/: checkpoints, config.yaml, log.jsonl, TensorBoard events, and gradcam.png (one held-out
referring expression on its image, as Predict.py draws it).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(REPO / "data" / "demo"), help="synthetic data folder (made if missing)")
    parser.add_argument("--output_dir", default=str(REPO / "output" / "demo"))
    parser.add_argument("--num-images", type=int, default=1500)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--opts", nargs="*", default=[], help="extra config overrides, key=value")
    args = parser.parse_args(argv)

    from dataset.synthetic import generate

    data = Path(args.data)
    started = time.time()
    generate(data, num_images=args.num_images, image_size=64, seed=0)
    print(f"[demo] synthetic data ready in {data} ({args.num_images} images)", flush=True)

    from engine import run
    from metrics.retrieval import chance_recall
    from Pretrain import PretrainTask

    metrics = run(PretrainTask, [
        "--config", str(REPO / "configs" / "demo" / "Pretrain.yaml"), "--output_dir", args.output_dir,
        "--opts", f"data.train_file=[{data / 'pretrain.json'}]", f"data.eval_file={data / 'retrieval_test.json'}",
        f"data.eval_image_root={data / 'images'}", f"model.tokenizer={data / 'vocab.txt'}",
        f"train.epochs={args.epochs}", *args.opts,
    ])
    test = json.loads((data / "retrieval_test.json").read_text())
    img2txt, offset = [], 0
    for entry in test:
        img2txt.append(list(range(offset, offset + len(entry["caption"]))))
        offset += len(entry["caption"])
    print(f"\n[demo] zero-shot retrieval on {len(test)} held-out images / {offset} captions "
          f"(pretraining + evaluation took {time.time() - started:.0f} s)")
    print(f"{'':26}{'R@1':>8}{'R@5':>8}{'R@10':>8}")
    rows = (("img->txt", "txt_r", 0), ("txt->img", "img_r", 1))
    for label, prefix in (("ITC + ITM re-rank", ""), ("ITC only", "itc_")):
        for direction, key, _ in rows:
            ours = [metrics.get(f"val/{prefix}{key}{k}", float("nan")) for k in (1, 5, 10)]
            print(f"{direction:8}{label:>18}" + "".join(f"{v:8.1f}" for v in ours))
    for direction, _, idx in rows:
        chance = [chance_recall(img2txt, offset, k)[idx] for k in (1, 5, 10)]
        print(f"{direction:8}{'chance':>18}" + "".join(f"{v:8.1f}" for v in chance))
    from tasks.demo_gradcam import write_demo_gradcam

    write_demo_gradcam(Path(args.output_dir), data)
    print(f"[demo] outputs in {args.output_dir}: checkpoints, log.jsonl, tensorboard/, config.yaml")
    return 0


if __name__ == "__main__":
    sys.exit(main())
