"""The ALBEF base every task model builds on.

It holds the image encoder (``visual_encoder``), the text / fusion encoder (``text_encoder``), and the pieces the
tasks share: projections to ``embed_dim``, the learnable temperature, the ITM head, momentum copies updated as an
exponential moving average with ``torch._foreach_*`` (``*_m`` modules), feature queues filled with features gathered
from every rank, and the loss blocks (ITC with momentum-distilled soft targets, ITM with hard negatives sampled
without a Python loop or host sync, MLM scored only at the masked positions). A task model is a short subclass that
says which of these it has and what its forward computes.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common import dist
from models.layers import resolve_memory_efficient, soft_contrastive_loss
from models.vit import VisionCfg, create_vit
from models.xbert import BertConfig, BertLMHeadModel, BertModel, init_bert_weights, select_image_kv

log = logging.getLogger(__name__)

@dataclass
class AlbefCfg:
    """The ``model:`` config block shared by every task, typed: the one home of its keys and defaults (tasks add their
    own keys next to these; ``MODEL_DEFAULTS`` is derived from it). Resolved once, when a model is built."""

    bert_config: str = "configs/config_bert.json"  # BertConfig-style JSON with fusion_layer and encoder_width (ALBEF's)
    bert_overrides: dict[str, Any] = field(default_factory=dict)  # open: BertConfig fields, e.g. {num_hidden_layers: 4}
    text_encoder: str = "bert-base-uncased"  # transformers weights for the text encoder in real runs; "" = random init
    tokenizer: str = "bert-base-uncased"  # hub name, or a vocab.txt path / directory (offline)
    vit: VisionCfg = field(default_factory=VisionCfg)  # image encoder (timm VisionTransformer)
    image_res: int = 256  # input resolution in pixels
    embed_dim: int = 256  # width of the ITC projections
    temp: float = 0.07  # initial ITC temperature (learnable, clamped to [0.001, 0.5])
    queue_size: int = 65536  # ITC feature queue length; a multiple of the global batch keeps ALBEF's layout
    momentum: float = 0.995  # EMA factor of the momentum encoders
    alpha: float = 0.4  # weight of the momentum-distilled soft targets
    distill: bool = True  # momentum distillation on/off (tasks where ALBEF makes it optional)
    warm_up: bool = True  # ramp alpha from 0 over the first epoch as ALBEF does
    mlm_probability: float = 0.15
    # Share of ITM negatives drawn uniformly instead of by similarity (ALBEF: 0, hard negatives only). From random
    # init on captions that fit many images, the hardest negatives are often true matches and ITM learns nothing.
    itm_random_negatives: float = 0.0
    grad_checkpointing: bool = False  # activation checkpointing in both encoders
    # null (auto) | true | false: build with models.layers' memory-efficient layers (same maths, less activation
    # memory, more kernels). auto: on where no CUDA device is present (CPU fp32 training), off beside a GPU, where the
    # step is host-bound (benchmarks/README.md).
    memory_efficient: bool | str | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= float(self.itm_random_negatives) <= 1.0:
            raise ValueError(f"model.itm_random_negatives must be in [0, 1], got {self.itm_random_negatives}")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> AlbefCfg:
        """The typed block from a ``model:`` mapping; keys that are not fields (a task's own) are left out."""
        known = {k: v for k, v in dict(values).items() if k in cls.__dataclass_fields__}
        if "vit" in known:
            known["vit"] = VisionCfg.from_dict(known["vit"])
        if "bert_overrides" in known:
            known["bert_overrides"] = dict(known["bert_overrides"] or {})
        return cls(**known)


MODEL_DEFAULTS: dict[str, Any] = asdict(AlbefCfg())  # the schema of the `model:` block (tasks/base.py)


@dataclass(frozen=True)
class SpecialTokens:
    """Token ids the models need from the tokenizer."""

    pad: int = 0
    cls: int = 101
    sep: int = 102
    mask: int = 103
    vocab_size: int = 30522

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> SpecialTokens:
        return cls(pad=tokenizer.pad_token_id, cls=tokenizer.cls_token_id, sep=tokenizer.sep_token_id,
                   mask=tokenizer.mask_token_id, vocab_size=len(tokenizer))


def build_bert_config(cfg: AlbefCfg, vocab_size: int | None) -> BertConfig:
    """The BertConfig from ``cfg.bert_config`` + ``cfg.bert_overrides``; vocab_size follows the tokenizer."""
    bert = BertConfig.from_json_file(cfg.bert_config)
    overrides = dict(cfg.bert_overrides)
    if vocab_size is not None:
        overrides["vocab_size"] = vocab_size
    unknown = set(overrides) - set(BertConfig.__dataclass_fields__)
    if unknown:
        raise ValueError(f"model.bert_overrides: unknown BertConfig fields {sorted(unknown)}")
    return bert.replace(**overrides)


def momentum_update(online: list[nn.Parameter], momentum: list[nn.Parameter], factor: float) -> None:
    """param_m = factor * param_m + (1 - factor) * param, for all parameters at once (foreach kernels)."""
    if not momentum:
        return
    with torch.no_grad():
        torch._foreach_mul_(momentum, factor)
        torch._foreach_add_(momentum, online, alpha=1.0 - factor)


def sample_hard_negatives(sim: Tensor, positive: Tensor, eps: float, random_share: float = 0.0) -> Tensor:
    """For each row of the in-batch similarity ``sim`` (B, B), draw one column with probability softmax(sim) (+eps),
    never a positive (``positive`` (B, B) bool). One multinomial call, no host sync. A row whose every column is
    positive falls back to any other column.

    ``random_share`` in [0, 1] mixes in uniform draws: each negative comes from the similarity weights with
    probability 1 - random_share and uniformly from the non-positives otherwise (0 is ALBEF's sampling, unchanged)."""
    with torch.no_grad():
        weights = F.softmax(sim.float(), dim=1) + eps
        weights = weights.masked_fill(positive, 0.0)
        if random_share > 0:
            uniform = (~positive).float()
            weights = ((1 - random_share) * weights / weights.sum(dim=1, keepdim=True).clamp_min(1e-30)
                       + random_share * uniform / uniform.sum(dim=1, keepdim=True).clamp_min(1.0))
        empty = weights.sum(dim=1, keepdim=True) <= 0
        fallback = (~torch.eye(sim.shape[0], dtype=torch.bool, device=sim.device)).float()
        weights = torch.where(empty, fallback, weights)
        return torch.multinomial(weights, 1).squeeze(1)


def mask_tokens(input_ids: Tensor, special: SpecialTokens, probability: float,
                generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """BERT masking as ALBEF does it: each non-[PAD]/[CLS] token is chosen with ``probability``; of those 80% become
    [MASK], 10% a random token, 10% stay. Returns (masked input_ids, labels with -100 where not chosen)."""
    # Elementwise selections (no boolean-index writes, whose sizes depend on the draw), and the generator passed only
    # when given (generator=None selects rand's explicit-generator overload): both keep the function traceable by
    # torch.compile, with the same draws and results as in eager mode.
    rng: dict[str, Any] = {"device": input_ids.device} if generator is None else {"device": input_ids.device,
                                                                                  "generator": generator}
    chosen = torch.rand(input_ids.shape, **rng) < probability  # (B, L)
    chosen &= (input_ids != special.pad) & (input_ids != special.cls)
    labels = torch.where(chosen, input_ids, -100)
    replaced = (torch.rand(input_ids.shape, **rng) < 0.8) & chosen
    randomised = (torch.rand(input_ids.shape, **rng) < 0.5) & chosen & ~replaced
    random_words = torch.randint(special.vocab_size, input_ids.shape, **rng)
    input_ids = torch.where(replaced, special.mask, input_ids)
    input_ids = torch.where(randomised, random_words, input_ids)
    return input_ids, labels


def load_bert_weights(module: nn.Module, name_or_path: str) -> None:
    """Initialise our BERT (``BertModel`` or ``BertLMHeadModel``) from transformers' BertForMaskedLM weights
    (bert-base-uncased for real runs, or a local directory). Cross-attention layers have no counterpart and keep their
    random init; a decoder with fewer layers takes the first ones (as ALBEF's VQA decoder does)."""
    from transformers import BertForMaskedLM

    source = BertForMaskedLM.from_pretrained(name_or_path).state_dict()
    if not isinstance(module, BertLMHeadModel):
        source = {k[len("bert."):]: v for k, v in source.items() if k.startswith("bert.")}
    target = module.state_dict()
    usable = {k: v for k, v in source.items() if k in target and target[k].shape == v.shape}
    module.load_state_dict(usable, strict=False)
    skipped = sorted(set(target) - set(usable))
    log.info("text encoder initialised from %s: %d tensors loaded, %d left at random init (e.g. %s)",
             name_or_path, len(usable), len(skipped), skipped[:3])


class AlbefBase(nn.Module):
    """Encoders + the shared blocks. Subclasses call ``_build_*`` for what they have and define ``forward``."""

    # Pairs (online module name, momentum module name); filled by _build_momentum.
    momentum_pairs: tuple[tuple[str, str], ...] = ()

    def __init__(self, cfg: dict[str, Any], special: SpecialTokens) -> None:
        super().__init__()
        self.cfg = {**MODEL_DEFAULTS, **dict(cfg)}  # the raw block, with a task's own keys (read at construction)
        self.model_cfg = config = AlbefCfg.from_dict(self.cfg)
        self.special = special
        self.bert_config = build_bert_config(config, special.vocab_size)
        self.visual_encoder = create_vit(config.vit, config.image_res)
        self.momentum = float(config.momentum)
        self.distill = bool(config.distill)  # tasks where ALBEF makes momentum distillation optional
        self.itm_random_negatives = float(config.itm_random_negatives)
        if config.grad_checkpointing:
            self.visual_encoder.set_grad_checkpointing(True)
        # Applied by create_model once the subclass has built every module (models.layers.apply_memory_efficient).
        self.memory_efficient = resolve_memory_efficient(config.memory_efficient)

    # ---- building blocks -------------------------------------------------------------------------------------------
    @property
    def vision_width(self) -> int:
        return self.visual_encoder.embed_dim

    def _new_text_encoder(self, with_mlm_head: bool, bert_config: BertConfig | None = None,
                          causal: bool = False) -> nn.Module:
        config = bert_config or self.bert_config
        module = BertLMHeadModel(config, causal=causal) if with_mlm_head else BertModel(config, causal=causal)
        init_bert_weights(module, config.initializer_range)
        if self.model_cfg.text_encoder:
            load_bert_weights(module, self.model_cfg.text_encoder)
        if self.model_cfg.grad_checkpointing:
            (module.bert if with_mlm_head else module).encoder.gradient_checkpointing = True
        return module

    def _build_projections(self) -> None:
        embed_dim = self.model_cfg.embed_dim
        self.vision_proj = nn.Linear(self.vision_width, embed_dim)
        self.text_proj = nn.Linear(self.bert_config.hidden_size, embed_dim)
        self.temp = nn.Parameter(torch.tensor(float(self.model_cfg.temp)))

    def _build_momentum(self, names: list[str]) -> None:
        """Create ``<name>_m`` frozen copies of the named modules."""
        for name in names:
            copy_m = copy.deepcopy(getattr(self, name))
            for param in copy_m.parameters():
                param.requires_grad_(False)
            setattr(self, f"{name}_m", copy_m)
        self.momentum_pairs = tuple((name, f"{name}_m") for name in names)

    def _build_queues(self, with_idx: bool = False) -> None:
        embed_dim, size = self.model_cfg.embed_dim, self.model_cfg.queue_size
        self.register_buffer("image_queue", F.normalize(torch.randn(embed_dim, size), dim=0))
        self.register_buffer("text_queue", F.normalize(torch.randn(embed_dim, size), dim=0))
        if with_idx:
            self.register_buffer("idx_queue", torch.full((1, size), -100, dtype=torch.long))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    # ---- momentum and queues ---------------------------------------------------------------------------------------
    def _momentum_params(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        online, momentum = [], []
        for name, name_m in self.momentum_pairs:
            online += list(getattr(self, name).parameters())
            momentum += list(getattr(self, name_m).parameters())
        return online, momentum

    def copy_params_to_momentum(self) -> None:
        """Momentum copies start equal to the online modules (after loading weights)."""
        online, momentum = self._momentum_params()
        if momentum:
            with torch.no_grad():
                torch._foreach_copy_(momentum, online)

    def momentum_update(self) -> None:
        online, momentum = self._momentum_params()
        momentum_update(online, momentum, self.momentum)

    @torch.no_grad()
    def dequeue_and_enqueue(self, image_feat: Tensor, text_feat: Tensor, idx: Tensor | None = None) -> None:
        """Write the features of the whole global batch (gathered from every rank, in rank order) at the queue
        pointer, wrapping around; pointer arithmetic stays on the device (no host sync)."""
        image_feats = dist.all_gather_equal(image_feat)  # (B_global, E); every rank holds a full batch
        text_feats = dist.all_gather_equal(text_feat)
        size = self.image_queue.shape[1]
        slots = (self.queue_ptr + torch.arange(image_feats.shape[0], device=self.queue_ptr.device)) % size
        self.image_queue.index_copy_(1, slots, image_feats.T.to(self.image_queue.dtype))
        self.text_queue.index_copy_(1, slots, text_feats.T.to(self.text_queue.dtype))
        if idx is not None:
            idxs = dist.all_gather_equal(idx.view(-1))
            self.idx_queue.index_copy_(1, slots, idxs.view(1, -1))
        self.queue_ptr.copy_((self.queue_ptr + image_feats.shape[0]) % size)

    # ---- the public encoding surface (every task) ------------------------------------------------------------------
    @property
    def text_bert(self) -> BertModel:
        return self.text_encoder.bert if isinstance(self.text_encoder, BertLMHeadModel) else self.text_encoder

    def encode_image(self, image: Tensor) -> Tensor:
        """(B, 3, H, W) normalised pixels -> (B, 1 + N, D_v) tokens after the final norm."""
        return self.visual_encoder(image)

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(B, L) ids -> (B, L, D_t) from the text-only layers."""
        return self.text_bert(input_ids, attention_mask, mode="text")

    def fuse(self, text_embeds: Tensor, attention_mask: Tensor, image_embeds: Tensor | None,
             image_kv: list | None = None) -> Tensor:
        """Fusion layers over text embeddings attending to the image tokens -> (B, L, D_t). ``image_kv``
        (``text_bert.precompute_image_kv``) replaces ``image_embeds`` when the same images are fused several times."""
        return self.text_bert(encoder_embeds=text_embeds, attention_mask=attention_mask,
                              encoder_hidden_states=image_embeds, mode="fusion", image_kv=image_kv)

    def image_feat(self, image_embeds: Tensor) -> Tensor:
        return F.normalize(self.vision_proj(image_embeds[:, 0, :]), dim=-1)

    def text_feat(self, text_embeds: Tensor) -> Tensor:
        return F.normalize(self.text_proj(text_embeds[:, 0, :]), dim=-1)

    def clamp_temp(self) -> None:
        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)

    @property
    def text_bert_m(self) -> BertModel:
        enc = self.text_encoder_m
        return enc.bert if isinstance(enc, BertLMHeadModel) else enc

    def itc_itm(self, image: Tensor, input_ids: Tensor, attention_mask: Tensor, alpha: float,
                idx: Tensor | None = None, neg_image_for_text: Tensor | None = None,
                neg_text_for_image: Tensor | None = None, negative_eps: float = 1e-4,
                mlm_input_ids: Tensor | None = None) -> dict[str, Any]:
        """The contrastive + matching part shared by pretraining, retrieval and grounding fine-tuning: encoders,
        momentum update and features, ITC against the queues, queue update, ITM with hard negatives. Returns the
        two losses plus what MLM reuses (image_embeds, image_embeds_m, image_kv).

        ``mlm_input_ids`` (pretraining: the masked copies of the texts) ride along in the same passes: the text layers
        run once over 2B texts and the fusion layers once over the 3B ITM pairs + the B masked texts with their
        images; their fused hidden states come back as ``mlm_hidden`` (B, L, D). Same values as separate passes, but
        each layer's weight gradient is formed in one piece, so backward holds no partial gradient of a layer while
        waiting for the other pass to reach it (live tensor peak of the base step 1.50 -> 1.15 GB), and the matmuls are
        larger."""
        self.clamp_temp()
        # Text before image: backward then reaches the ViT (created later) before the text-only layers, and frees
        # the ViT's activations before those layers' gradients are allocated.
        mlm_text_embeds = None
        if mlm_input_ids is None:
            text_embeds = self.encode_text(input_ids, attention_mask)
        else:
            text_embeds, mlm_text_embeds = self.encode_text(
                torch.cat([input_ids, mlm_input_ids]), attention_mask.repeat(2, 1)).chunk(2)
        text_feat = self.text_feat(text_embeds)
        image_embeds = self.encode_image(image)
        image_feat = self.image_feat(image_embeds)
        with torch.no_grad():
            self.momentum_update()
            image_embeds_m = self.visual_encoder_m(image)
            image_feat_m = F.normalize(self.vision_proj_m(image_embeds_m[:, 0, :]), dim=-1)
            text_embeds_m = self.text_bert_m(input_ids, attention_mask, mode="text")
            text_feat_m = F.normalize(self.text_proj_m(text_embeds_m[:, 0, :]), dim=-1)
        loss_ita = self.contrastive_loss(image_feat, text_feat, image_feat_m, text_feat_m, alpha, idx=idx)
        self.dequeue_and_enqueue(image_feat_m, text_feat_m, idx)
        sim_i2t, sim_t2i = self.inbatch_sims(image_feat, text_feat, image_feat_m, text_feat_m)
        image_kv = self.text_bert.precompute_image_kv(image_embeds)  # shared by every fusion pass of the step
        texts, masks, rows = self.matching_pairs(text_embeds, attention_mask, sim_i2t, sim_t2i, idx=idx,
                                                 neg_image_for_text=neg_image_for_text,
                                                 neg_text_for_image=neg_text_for_image, negative_eps=negative_eps)
        out = {"image_embeds": image_embeds, "image_embeds_m": image_embeds_m, "image_kv": image_kv,
               "loss_ita": loss_ita}
        if mlm_text_embeds is not None:
            texts, masks = torch.cat([texts, mlm_text_embeds]), torch.cat([masks, attention_mask])
            rows = torch.cat([rows, torch.arange(image.shape[0], device=rows.device)])
        fused = self.fuse(texts, masks, None, image_kv=select_image_kv(image_kv, rows))
        pairs = 3 * image.shape[0]
        out["loss_itm"] = self.itm_loss(fused[:pairs, 0, :])
        if mlm_text_embeds is not None:
            out["mlm_hidden"] = fused[pairs:]
        return out

    # ---- shared losses ---------------------------------------------------------------------------------------------
    def contrastive_loss(self, image_feat: Tensor, text_feat: Tensor, image_feat_m: Tensor | None,
                         text_feat_m: Tensor | None, alpha: float, idx: Tensor | None = None) -> Tensor:
        """ITC against in-batch momentum features + the queues, with momentum-distilled soft targets.

        Hard targets: the diagonal, or with ``idx`` (retrieval) every entry with the same image id (spread evenly).
        ``image_feat_m`` / ``text_feat_m`` are the momentum features of this batch (no grad).
        """
        with torch.no_grad():
            image_feat_all = torch.cat([image_feat_m.t(), self.image_queue], dim=1)  # (E, B+Q)
            text_feat_all = torch.cat([text_feat_m.t(), self.text_queue], dim=1)
            if idx is None:
                targets = torch.zeros(image_feat.shape[0], image_feat_all.shape[1], device=image_feat.device)
                targets.fill_diagonal_(1)
            else:
                idx_all = torch.cat([idx.view(1, -1), self.idx_queue.clone().detach()], dim=1)  # (1, B+Q)
                positive = torch.eq(idx.view(-1, 1), idx_all).float()
                targets = positive / positive.sum(dim=1, keepdim=True)
            if distilling(alpha):
                sim_i2t_m = image_feat_m @ text_feat_all / self.temp
                sim_t2i_m = text_feat_m @ image_feat_all / self.temp
                targets_i2t = alpha * F.softmax(sim_i2t_m, dim=1) + (1 - alpha) * targets
                targets_t2i = alpha * F.softmax(sim_t2i_m, dim=1) + (1 - alpha) * targets
            else:
                targets_i2t = targets_t2i = targets
        loss_i2t = soft_contrastive_loss(image_feat, self.temp, text_feat_all, targets_i2t)
        loss_t2i = soft_contrastive_loss(text_feat, self.temp, image_feat_all, targets_t2i)
        return (loss_i2t + loss_t2i) / 2

    def inbatch_sims(self, image_feat: Tensor, text_feat: Tensor, image_feat_m: Tensor, text_feat_m: Tensor
                     ) -> tuple[Tensor, Tensor]:
        """In-batch similarities that drive hard-negative sampling: as ALBEF, online features against the momentum
        features of the batch, (B, B) image->text and text->image."""
        with torch.no_grad():
            return image_feat @ text_feat_m.t() / self.temp, text_feat @ image_feat_m.t() / self.temp

    def matching_loss(self, image_embeds: Tensor, text_embeds: Tensor, attention_mask: Tensor,
                      sim_i2t: Tensor | None = None, sim_t2i: Tensor | None = None, idx: Tensor | None = None,
                      neg_image_for_text: Tensor | None = None, neg_text_for_image: Tensor | None = None,
                      image_kv: list | None = None, negative_eps: float = 1e-4) -> Tensor:
        """ITM: the positive pairs, plus for each text a hard negative image and for each image a hard negative text
        (``matching_pairs``), in one fusion pass of 3B pairs that reuses the image key/values."""
        if image_kv is None:
            image_kv = self.text_bert.precompute_image_kv(image_embeds)
        texts, masks, rows = self.matching_pairs(text_embeds, attention_mask, sim_i2t, sim_t2i, idx=idx,
                                                 neg_image_for_text=neg_image_for_text,
                                                 neg_text_for_image=neg_text_for_image, negative_eps=negative_eps)
        return self.itm_loss(self.fuse(texts, masks, None, image_kv=select_image_kv(image_kv, rows))[:, 0, :])

    def matching_pairs(self, text_embeds: Tensor, attention_mask: Tensor,
                       sim_i2t: Tensor | None = None, sim_t2i: Tensor | None = None, idx: Tensor | None = None,
                       neg_image_for_text: Tensor | None = None, neg_text_for_image: Tensor | None = None,
                       negative_eps: float = 1e-4) -> tuple[Tensor, Tensor, Tensor]:
        """The 3B ITM pairs as fusion inputs (texts, masks, image row of each pair), in ALBEF's order: positives,
        (text b, its negative image), (negative text, image b). Negatives are drawn from the in-batch similarities
        ``sim_i2t`` / ``sim_t2i`` (B, B), never a positive (the diagonal, or the same ``idx``), or passed in (tests,
        parity)."""
        batch = text_embeds.shape[0]
        if neg_image_for_text is None or neg_text_for_image is None:
            if sim_i2t is None or sim_t2i is None:
                raise ValueError("matching_loss needs the in-batch similarities or explicit negatives")
            if idx is None:
                positive = torch.eye(batch, dtype=torch.bool, device=text_embeds.device)
            else:
                positive = torch.eq(idx.view(-1, 1), idx.view(1, -1))
            share = self.itm_random_negatives
            neg_image_for_text = sample_hard_negatives(sim_t2i, positive, negative_eps, share)
            neg_text_for_image = sample_hard_negatives(sim_i2t, positive, negative_eps, share)
        texts = torch.cat([text_embeds, text_embeds, text_embeds[neg_text_for_image]])
        masks = torch.cat([attention_mask, attention_mask, attention_mask[neg_text_for_image]])
        images = torch.arange(batch, device=text_embeds.device)
        return texts, masks, torch.cat([images, neg_image_for_text.to(images.device), images])

    def itm_loss(self, fused_cls: Tensor) -> Tensor:
        """Cross-entropy of the ITM head on the fused [CLS] states of the 3B pairs (the first B positive)."""
        logits = self.itm_head(fused_cls)  # (3B, 2)
        batch = logits.shape[0] // 3
        labels = torch.cat([torch.ones(batch, dtype=torch.long), torch.zeros(2 * batch, dtype=torch.long)])
        return F.cross_entropy(logits, labels.to(logits.device))

    def mlm_loss(self, input_ids: Tensor, labels: Tensor, attention_mask: Tensor, image_embeds: Tensor,
                 image_embeds_m: Tensor | None, alpha: float, image_kv: list | None = None,
                 hidden: Tensor | None = None) -> Tensor:
        """Masked language modelling conditioned on the image, with the momentum model's predictions as soft labels.
        Vocabulary logits are computed only at the masked positions (the loss only reads those). ``hidden``: the
        fused states of ``input_ids`` when already computed (``itc_itm(mlm_input_ids=...)``)."""
        scored = labels != -100  # (B, L)
        if hidden is None:
            hidden = self.text_encoder.bert(input_ids, attention_mask, encoder_hidden_states=image_embeds,
                                            mode="multi_modal", image_kv=image_kv)
        logits = self.text_encoder.cls(hidden[scored])  # (M, V)
        targets = labels[scored]  # (M,)
        # Means over the M masked tokens taken as sums / max(M, 1): 0 with a zero gradient when no token was masked,
        # and no Python branch on M, which torch.compile only knows when the step runs.
        count = scored.sum().clamp(min=1)
        loss = F.cross_entropy(logits, targets, reduction="sum") / count
        if image_embeds_m is not None and distilling(alpha):
            with torch.no_grad():
                hidden_m = self.text_encoder_m.bert(input_ids, attention_mask, encoder_hidden_states=image_embeds_m,
                                                    mode="multi_modal")
                soft = F.softmax(self.text_encoder_m.cls(hidden_m[scored]), dim=-1)
            distill = -(F.log_softmax(logits, dim=-1) * soft).sum() / count
            loss = (1 - alpha) * loss + alpha * distill
        return loss


def distilling(alpha: float | Tensor) -> bool:
    """Whether momentum distillation enters the losses: for a float alpha when it is above 0; for a 0-d tensor alpha
    (what tasks pass under train.compile, so that the warm-up ramp is an input of the compiled step, not a constant
    that each new value recompiles) always: at alpha 0 the mixes (1 - alpha) * a + alpha * b are exactly a."""
    return isinstance(alpha, Tensor) or alpha > 0


def ramp_alpha(alpha: float, warm_up: bool, epoch: int, iter_in_epoch: int, iters_per_epoch: int) -> float:
    """ALBEF's distillation warm-up: alpha grows linearly over the first epoch."""
    if warm_up and epoch == 0 and iters_per_epoch > 0:
        return alpha * min(1.0, iter_in_epoch / iters_per_epoch)
    return alpha


# ---- key surgery shared by the checkpoint_filter_fn of several task models ----
def resample_image_pos_embeds(state_dict: dict[str, Tensor], model: nn.Module,
                              notes: list[str] | None = None) -> dict[str, Tensor]:
    """Resample the position embedding of ``visual_encoder`` (and ``visual_encoder_m``) to the model's image_res."""
    from models.vit import resample_pos_embed

    for name in ("visual_encoder", "visual_encoder_m"):
        if hasattr(model, name):
            state_dict = resample_pos_embed(state_dict, getattr(model, name), f"{name}.", notes)
    return state_dict


TEXT_ENCODERS = ("text_encoder", "text_encoder_m")


def strip_bert_prefix(state_dict: dict[str, Tensor], encoder_names: tuple[str, ...] = TEXT_ENCODERS,
                      notes: list[str] | None = None) -> dict[str, Tensor]:
    """Pretraining checkpoints hold the text encoder as ``text_encoder.bert.*`` (+ MLM head ``text_encoder.cls.*``);
    task models without the MLM head hold it as ``text_encoder.*``. Renames the former to the latter; the MLM head
    keys are left and reported as unused. ``notes`` receives a line saying so when it renamed any key."""
    out: dict[str, Tensor] = {}
    renamed = 0
    for key, value in state_dict.items():
        head, _, rest = key.partition(".")
        if head in encoder_names and rest.startswith("bert."):
            out[f"{head}.{rest[len('bert.'):]}"] = value
            renamed += 1
        else:
            out[key] = value
    if renamed and notes is not None:
        notes.append(f"text_encoder.bert.* -> text_encoder.* ({renamed} keys)")
    return out
