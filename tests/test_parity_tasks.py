"""Parity with ALBEF's reference implementation for the retrieval, VQA, NLVR2 and SNLI-VE models (micro size):
the reference state_dicts load strictly (official key names, tied weights) and the outputs are equal."""

from __future__ import annotations

import torch

from tests.conftest import load_reference
from tests.parity_utils import build_reference_model, check_encoders, close


def test_retrieval_outputs_and_losses(reference_dir, tmp_path):
    ref = load_reference(reference_dir, "retrieval_micro.pt")
    model = build_reference_model("retrieval", ref, tmp_path).eval()
    image, ids, mask = ref["image"], ref["text.input_ids"], ref["text.attention_mask"]
    image_embeds, text_embeds = check_encoders(model, ref, image, ids, mask)
    with torch.no_grad():
        n = image.shape[0]
        pairs = model.itm_head(model.fuse(text_embeds.repeat(n, 1, 1), mask.repeat(n, 1),
                                          image_embeds.repeat_interleave(n, 0))[:, 0, :])
        close(pairs.view(n, n, 2), ref["outputs.itm_logits_all_pairs"])
        inj = "losses_eval_injected."
        losses = model(image, ref["text_train.input_ids"], ref["text_train.attention_mask"], idx=ref[inj + "idx"],
                       alpha=ref[inj + "alpha"], neg_image_for_text=ref[inj + "neg_image_for_text"],
                       neg_text_for_image=ref[inj + "neg_text_for_image"])
    close(losses["loss_ita"], ref[inj + "loss_ita"])
    close(losses["loss_itm"], ref[inj + "loss_itm"])


def test_ve_prediction_and_distilled_loss(reference_dir, tmp_path):
    ref = load_reference(reference_dir, "ve_micro.pt")
    model = build_reference_model("ve", ref, tmp_path).eval()
    args = (ref["image"], ref["text.input_ids"], ref["text.attention_mask"])
    with torch.no_grad():
        close(model.logits(*args), ref["outputs.prediction"])
        loss = model(*args, targets=ref["targets"], alpha=ref["losses.alpha"])["loss_cls"]
    close(loss, ref["losses.loss_eval_mode"])


def test_nlvr_prediction_shared_kv_and_distilled_loss(reference_dir, tmp_path):
    ref = load_reference(reference_dir, "nlvr_micro.pt")
    model = build_reference_model("nlvr", ref, tmp_path).eval()
    layers = model.text_encoder.encoder.layer
    assert len(layers) == ref["nlvr_num_hidden_layers"]
    assert layers[2].crossattention.self.key is layers[3].crossattention.self.key
    assert layers[2].crossattention.self.query is not layers[3].crossattention.self.query
    args = (ref["images"], ref["text.input_ids"], ref["text.attention_mask"])
    with torch.no_grad():
        close(model.visual_encoder(ref["images"]), ref["outputs.image_embeds"])
        close(model.logits(*args), ref["outputs.prediction"])
        loss = model(*args, targets=ref["targets"], alpha=ref["losses.alpha"])["loss_cls"]
    close(loss, ref["losses.loss_eval_mode"])


def test_vqa_states_ranking_and_loss(reference_dir, tmp_path):
    ref = load_reference(reference_dir, "vqa_micro.pt")
    model = build_reference_model("vqa", ref, tmp_path).eval()
    image = ref["image"]
    q_ids, q_mask = ref["question_test.input_ids"], ref["question_test.attention_mask"]
    a_ids, a_mask = ref["answer_input.input_ids"], ref["answer_input.attention_mask"]
    with torch.no_grad():
        close(model.visual_encoder(image), ref["outputs.image_embeds"])
        states = model.encode_question(image, q_ids, q_mask)
        close(states, ref["outputs.question_states"])
        start = a_ids[:1, :1].expand(states.shape[0], 1)
        first = model.text_decoder(start, None, encoder_hidden_states=states, encoder_attention_mask=q_mask)
        close(first[:, 0, :], ref["outputs.first_token_logits"])
        topk_ids, topk_probs = model.rank_answers(states, q_mask, a_ids, a_mask, k=ref["k"])
        assert torch.equal(topk_ids, ref["outputs.topk_ids"])
        close(topk_probs, ref["outputs.topk_probs"])
        counts = torch.tensor(ref["losses.k"])
        loss = model(image, ref["question_train.input_ids"], ref["question_train.attention_mask"],
                     ref["answer_train.input_ids"], ref["answer_train.attention_mask"], ref["losses.weights"],
                     counts)["loss_vqa"]
    close(loss, ref["losses.loss_eval_mode"])


def test_retrieval_two_stage_evaluation_matches_reference(reference_dir, tmp_path):
    """ALBEF's Retrieval.evaluation (k_test 3) on 4 images x 8 texts: the same ITM score matrices and metrics."""
    from dataset.tokenizer import tokenize
    from metrics.retrieval import recall_at_k
    from tasks.retrieval_eval import two_stage_scores
    from tests.tokenizer_helpers import reference_tokenizer

    ref = load_reference(reference_dir, "retrieval_micro.pt")
    model = build_reference_model("retrieval", ref, tmp_path).eval()
    tokenizer = reference_tokenizer(ref["vocab"], tmp_path)
    ids, mask = tokenize(tokenizer, ref["evaluation.texts"], 30, padding="max_length")
    with torch.no_grad():
        text_embeds = model.encode_text(ids, mask)
        image_embeds = model.encode_image(ref["image"])
        score_i2t, score_t2i = two_stage_scores(model, image_embeds, model.image_feat(image_embeds), text_embeds,
                                                mask, model.text_feat(text_embeds), k_test=ref["evaluation.k_test"],
                                                query_batch=3)
    close(score_i2t, ref["evaluation.score_matrix_i2t"])
    close(score_t2i, ref["evaluation.score_matrix_t2i"])
    img2txt = ref["evaluation.img2txt"].tolist()
    metrics = recall_at_k(score_i2t, score_t2i, img2txt, ref["evaluation.txt2img"].tolist())
    for key, value in ref["evaluation.itm_eval_metrics"].items():
        assert abs(metrics[key] - value) < 1e-6, (key, metrics[key], value)
