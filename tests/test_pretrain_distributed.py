"""Two gloo processes: the ITC queues hold the momentum features of the whole global batch, in rank order, and are
identical on both ranks after a pretraining step."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from tests.test_models import SPECIAL, tiny_batch, tiny_cfg


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, port: int, tmp: str, results: dict) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    from engine import dist
    from models import create_model

    dist.init_distributed("cpu", 120.0)
    try:
        torch.manual_seed(0)  # same weights on both ranks
        model = create_model("pretrain", tiny_cfg(Path(tmp), queue_size=16), special=SPECIAL).eval()
        image, ids, mask = tiny_batch(batch=4, seed=10 + rank)  # each rank its own local batch
        negatives = torch.tensor([1, 2, 3, 0])
        model(image, ids, mask, alpha=0.4, neg_image_for_text=negatives, neg_text_for_image=negatives.flip(0))
        with torch.no_grad():  # this rank's momentum features (eval mode: the same as inside the step)
            image_feat_m = F.normalize(model.vision_proj_m(model.visual_encoder_m(image)[:, 0, :]), dim=-1)
            text_feat_m = F.normalize(model.text_proj_m(model.text_encoder_m.bert(ids, mask, mode="text")[:, 0, :]),
                                      dim=-1)
        everyone = dist.all_gather_object((image_feat_m, text_feat_m))
        results[rank] = {"image_queue": model.image_queue.clone(), "text_queue": model.text_queue.clone(),
                         "ptr": int(model.queue_ptr), "expected_image": torch.cat([e[0] for e in everyone]),
                         "expected_text": torch.cat([e[1] for e in everyone])}
    finally:
        dist.destroy()


@pytest.mark.slow
@pytest.mark.dist
def test_queues_hold_the_global_batch_in_rank_order(tmp_path):
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_worker, args=(_free_port(), str(tmp_path), results), nprocs=2, join=True)
    assert set(results.keys()) == {0, 1}
    for rank in (0, 1):
        got = results[rank]
        assert got["ptr"] == 8  # 2 ranks x 4
        torch.testing.assert_close(got["image_queue"][:, :8], got["expected_image"].T, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(got["text_queue"][:, :8], got["expected_text"].T, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(results[0]["image_queue"], results[1]["image_queue"])
    torch.testing.assert_close(results[0]["text_queue"], results[1]["text_queue"])
    # the two ranks' features really differ (the test would pass trivially otherwise)
    assert not torch.allclose(results[0]["expected_image"][:4], results[0]["expected_image"][4:])
