"""Parity with ALBEF's reference implementation: the pretraining model (micro size, random weights).

The reference state_dict loads strictly into our model (official key names), and every deterministic output equals
the reference's (ALBEF_REFERENCE_DIR; see tests/conftest.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tests.conftest import load_reference
from tests.parity_utils import build_reference_model, check_encoders, close


def test_pretrain_forward_outputs_match_reference(reference_dir, tmp_path):
    ref = load_reference(reference_dir, "pretrain_micro.pt")
    model = build_reference_model("pretrain", ref, tmp_path).eval()
    image, ids, mask = ref["image"], ref["text.input_ids"], ref["text.attention_mask"]
    image_embeds, text_embeds = check_encoders(model, ref, image, ids, mask)
    with torch.no_grad():
        image_feat, text_feat = model.image_feat(image_embeds), model.text_feat(text_embeds)
        close(model.temp.detach(), ref["outputs.temp"])
        close(text_feat @ image_feat.T / model.temp, ref["outputs.sim_t2i"])
        # every (image i, text j) pair, batched through precomputed image key/values
        n = image.shape[0]
        kv = model.text_bert.precompute_image_kv(image_embeds)
        from models.xbert import select_image_kv

        image_index = torch.arange(n).repeat_interleave(n)  # i major
        text_index = torch.arange(n).repeat(n)
        fused_all = model.fuse(text_embeds[text_index], mask[text_index], None,
                               image_kv=select_image_kv(kv, image_index))
        close(model.itm_head(fused_all[:, 0, :]).view(n, n, 2), ref["outputs.itm_logits_all_pairs"])
        logits = model.text_encoder(ref["outputs.mlm_input_ids"], mask, encoder_hidden_states=image_embeds)
        close(logits, ref["outputs.mlm_logits"], atol=1e-4)


def test_pretrain_losses_gradients_and_queues_match_reference(reference_dir, tmp_path):
    ref = load_reference(reference_dir, "pretrain_micro.pt")
    model = build_reference_model("pretrain", ref, tmp_path).eval()
    inj = "losses_eval_injected."
    losses = model(ref["image"], ref["text.input_ids"], ref["text.attention_mask"], alpha=ref[inj + "alpha"],
                   neg_image_for_text=ref[inj + "neg_image_for_text"],
                   neg_text_for_image=ref[inj + "neg_text_for_image"],
                   mlm_input_ids=ref[inj + "mlm_input_ids"], mlm_labels=ref[inj + "mlm_labels"])
    for name in ("loss_ita", "loss_itm", "loss_mlm"):
        close(losses[name].detach(), ref[inj + name])
    total = losses["loss_ita"] + losses["loss_itm"] + losses["loss_mlm"]
    close(total.detach(), ref[inj + "loss_sum"])
    total.backward()
    expected_grads = ref[inj + "grads"]
    params = dict(model.named_parameters())
    assert set(expected_grads) <= set(params), sorted(set(expected_grads) - set(params))[:5]
    for name, grad in expected_grads.items():
        assert params[name].grad is not None, f"no gradient for {name}"
        close(params[name].grad, grad, atol=1e-5, rtol=1e-3)
    close(model.image_queue, ref[inj + "image_queue_after"])
    close(model.text_queue, ref[inj + "text_queue_after"])
    assert torch.equal(model.queue_ptr, ref[inj + "queue_ptr_after"])


def test_pretrain_state_dict_keys_equal_reference(reference_dir, tmp_path):
    ref = load_reference(reference_dir, "pretrain_micro.pt")
    model = build_reference_model("pretrain", ref, tmp_path)
    ours = model.state_dict()
    assert set(ours) == set(ref["state_dict"])
    for key, value in ref["state_dict"].items():
        assert ours[key].shape == value.shape, key


def test_masked_only_mlm_logits_equal_full_logits_then_selecting(reference_dir, tmp_path):
    """The fast MLM path (vocabulary logits only at masked positions) computes the same loss as full logits."""
    ref = load_reference(reference_dir, "pretrain_micro.pt")
    model = build_reference_model("pretrain", ref, tmp_path).eval()
    inj = "losses_eval_injected."
    ids, labels, mask = ref[inj + "mlm_input_ids"], ref[inj + "mlm_labels"], ref["text.attention_mask"]
    with torch.no_grad():
        image_embeds = model.encode_image(ref["image"])
        fast = model.mlm_loss(ids, labels, mask, image_embeds, None, alpha=0.0)
        full_logits = model.text_encoder(ids, mask, encoder_hidden_states=image_embeds)
        slow = F.cross_entropy(full_logits.view(-1, full_logits.shape[-1]), labels.view(-1), ignore_index=-100)
    close(fast, slow)
