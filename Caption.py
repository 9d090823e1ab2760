"""Image captioning: fine-tune, evaluate with COCO metrics, caption a folder. Three captioner families, picked by
``model.arch`` (the table at the end): ``albef_decoder`` (default; a BLIP-style decoder on the ALBEF backbone),
``prefix_lm`` (ViECap-style, trained on captions only: tasks/caption_prefix.py) and ``show_attend_tell`` (ResNet +
LSTM with soft attention: tasks/caption_sat.py); they share the files, metrics and result names described here.

    torchrun --nproc_per_node=8 Caption.py --config configs/Caption_coco.yaml --checkpoint ALBEF_4M.pth \
        --output_dir output/caption_coco
    python Caption.py --config configs/Caption_coco.yaml --checkpoint output/caption_coco/checkpoint_best.pth \
        --evaluate --output_dir output/captions --opts data.image_folder=photos/

Training files: ``[{image, caption, image_id}]`` (COCO Karpathy train, or any dataset in that format); evaluation
files: ``[{image, caption: [..]}]``, scored against ``data.{val,test}_gt_file`` (COCO-format ground truth) or, when
that is empty, against the captions of the evaluation file itself. Every evaluation writes
``caption_<split>_eval<N>.json`` (``[{image_id, caption}]``, plus ``captions`` with ``generation.num_return_sequences``
> 1) to the output folder and reports BLEU-1..4, METEOR (needs Java), ROUGE-L, CIDEr and SPICE (when its jars are
installed) plus ``score``, the mean of ``eval.score_metrics``, which picks the best checkpoint and drives early
stopping (``train.early_stop_patience``). Result files are never overwritten: N counts on from the largest number
already in the folder, so a second ``--evaluate`` into it writes ``..._eval2.json``.

With ``data.image_folder`` set, evaluation captions every image in that folder instead (``captions_folder.json``, then
``captions_folder_2.json``, ...: ``[{image, caption}]``); use it with ``--evaluate`` and a captioning checkpoint.
"""

from __future__ import annotations

from engine import main_for_families
from tasks.caption_decoder import CaptionTask

# The captioner family, by model.arch: the ALBEF/BLIP-style decoder (tasks/caption_decoder.py), ViECap-style
# text-only prefix captioning into GPT-2 (tasks/caption_prefix.py), or the ResNet + LSTM soft-attention captioner
# (tasks/caption_sat.py).
CAPTION_FAMILIES: dict = {
    "albef_decoder": CaptionTask,
    "prefix_lm": "tasks.caption_prefix:PrefixCaptionTask",
    "show_attend_tell": "tasks.caption_sat:ShowAttendTellTask",
}
main = main_for_families("model.arch", CAPTION_FAMILIES, default="albef_decoder")

if __name__ == "__main__":
    main()
