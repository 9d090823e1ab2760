"""optim: parameter groups, lr multipliers, freezing, optimizer names."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from optim import OPTIMIZER_DEFAULTS, apply_freeze, create_optimizer


class TinyBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, dim)


class TinyVisual(nn.Module):
    """The parameter layout of a timm ViT: patch_embed, cls_token, pos_embed, blocks, norm."""

    def __init__(self, dim: int = 8, depth: int = 3) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, 4, 4)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 5, dim))
        self.blocks = nn.ModuleList(TinyBlock(dim) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)


class TinyEncoder(nn.Module):
    def __init__(self, dim: int, depth: int) -> None:
        super().__init__()
        self.layer = nn.ModuleList(TinyBlock(dim) for _ in range(depth))


class TinyEmbeddings(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(10, dim)
        self.LayerNorm = nn.LayerNorm(dim)


class TinyText(nn.Module):
    """The parameter layout of a BERT: embeddings, encoder.layer, pooler."""

    def __init__(self, dim: int = 8, depth: int = 2) -> None:
        super().__init__()
        self.embeddings = TinyEmbeddings(dim)
        self.encoder = TinyEncoder(dim, depth)
        self.pooler = nn.Linear(dim, dim)


class TinyAlbef(nn.Module):
    def __init__(self, freeze_momentum: bool = True) -> None:
        super().__init__()
        self.visual_encoder = TinyVisual()
        self.visual_encoder_m = TinyVisual()
        self.text_encoder = TinyText()
        self.vision_proj = nn.Linear(8, 4)
        self.temp = nn.Parameter(torch.tensor(0.07))
        if freeze_momentum:
            self.visual_encoder_m.requires_grad_(False)


def _names_by_group(optimizer: torch.optim.Optimizer, model: nn.Module) -> list[tuple[dict, set[str]]]:
    names = {id(param): name for name, param in model.named_parameters()}
    return [(group, {names[id(param)] for param in group["params"]}) for group in optimizer.param_groups]


def _trainable(model: nn.Module, prefix: str = "") -> set[str]:
    return {name for name, param in model.named_parameters() if param.requires_grad and name.startswith(prefix)}


DECAY = {
    "visual_encoder.patch_embed.weight",
    "visual_encoder.blocks.0.fc.weight",
    "visual_encoder.blocks.1.fc.weight",
    "visual_encoder.blocks.2.fc.weight",
    "text_encoder.encoder.layer.0.fc.weight",
    "text_encoder.encoder.layer.1.fc.weight",
    "text_encoder.pooler.weight",
    "vision_proj.weight",
}


def test_no_decay_set_is_exact() -> None:
    model = TinyAlbef()
    optimizer = create_optimizer({"lr": 1e-3, "weight_decay": 0.05}, model)
    decay, no_decay = set(), set()
    for group, names in _names_by_group(optimizer, model):
        (decay if group["weight_decay"] > 0 else no_decay).update(names)
        assert group["weight_decay"] in (0.0, 0.05)
    assert decay == DECAY
    trainable = _trainable(model)
    assert no_decay == trainable - DECAY
    # Spot-check the rules: biases, norm weights, embeddings (2-D but named), pos_embed, cls_token, temp.
    assert {
        "visual_encoder.blocks.0.fc.bias",
        "visual_encoder.norm.weight",
        "visual_encoder.pos_embed",
        "visual_encoder.cls_token",
        "text_encoder.embeddings.word_embeddings.weight",
        "temp",
    } <= no_decay
    assert not any(name.startswith("visual_encoder_m") for name in decay | no_decay)


def test_lr_mult_groups_and_update_apply_decay_only_where_expected() -> None:
    model = TinyAlbef(freeze_momentum=False)
    cfg = {"lr": 1e-2, "weight_decay": 0.5, "lr_mult": {"visual_encoder": 0.1, "visual_encoder.blocks.2": 0.5}}
    optimizer = create_optimizer(cfg, model)
    for group, names in _names_by_group(optimizer, model):
        for name in names:
            if name.startswith("visual_encoder.blocks.2."):
                expected = 0.5
            elif name.startswith("visual_encoder."):
                expected = 0.1
            else:  # visual_encoder_m is not under the visual_encoder prefix
                expected = 1.0
            assert group["lr_mult"] == expected, name
            assert group["lr"] == pytest.approx(1e-2 * expected)
            assert group["initial_lr"] == pytest.approx(1e-2 * expected)

    # With zero gradients AdamW only applies its decoupled decay: p <- p * (1 - lr * wd) on decayed params.
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    for param in model.parameters():
        param.grad = torch.zeros_like(param)
    optimizer.step()
    for group, names in _names_by_group(optimizer, model):
        shrink = 1 - group["lr"] * group["weight_decay"]
        for name in names:
            param = dict(model.named_parameters())[name]
            torch.testing.assert_close(param.detach(), before[name] * shrink)
            assert (shrink < 1) == (group["weight_decay"] > 0)


def test_freeze_leaves_last_blocks_and_what_follows() -> None:
    model = TinyAlbef()
    create_optimizer({"freeze": {"visual_encoder": 1, "text_encoder": 0}}, model)
    assert _trainable(model, "visual_encoder.") == {
        "visual_encoder.blocks.2.norm1.weight",
        "visual_encoder.blocks.2.norm1.bias",
        "visual_encoder.blocks.2.fc.weight",
        "visual_encoder.blocks.2.fc.bias",
        "visual_encoder.norm.weight",
        "visual_encoder.norm.bias",
    }
    assert _trainable(model, "text_encoder.") == set()
    assert _trainable(model, "visual_encoder_m.") == set()  # frozen momentum copy stays frozen

    # BERT layout: the last layer and the pooler (after the encoder) stay trainable, the embeddings freeze.
    model = TinyAlbef()
    optimizer = create_optimizer({"freeze": {"text_encoder": 1}}, model)
    assert _trainable(model, "text_encoder.") == {
        "text_encoder.encoder.layer.1.norm1.weight",
        "text_encoder.encoder.layer.1.norm1.bias",
        "text_encoder.encoder.layer.1.fc.weight",
        "text_encoder.encoder.layer.1.fc.bias",
        "text_encoder.pooler.weight",
        "text_encoder.pooler.bias",
    }
    in_optimizer = {name for _, names in _names_by_group(optimizer, model) for name in names}
    assert in_optimizer == _trainable(model)


def test_freeze_on_timm_vit() -> None:
    from timm.models.vision_transformer import VisionTransformer

    vit = VisionTransformer(img_size=16, patch_size=8, embed_dim=16, depth=3, num_heads=2, num_classes=0)
    apply_freeze(vit, {"blocks.0": 0})  # any module prefix with 0 freezes it all
    assert _trainable(vit, "blocks.0.") == set() and _trainable(vit, "blocks.1.")

    vit = VisionTransformer(img_size=16, patch_size=8, embed_dim=16, depth=3, num_heads=2, num_classes=0)
    wrapper = nn.Module()
    wrapper.visual_encoder = vit
    apply_freeze(wrapper, {"visual_encoder": 2})
    # timm keeps its blocks in an nn.Sequential; what follows them (norm, fc_norm, head) stays trainable.
    trainable = {".".join(name.split(".")[1:3]) for name in _trainable(wrapper)}
    assert trainable == {"blocks.1", "blocks.2", "norm.weight", "norm.bias"}
    assert not vit.pos_embed.requires_grad and not vit.cls_token.requires_grad


def test_freeze_and_lr_mult_errors_name_the_module() -> None:
    with pytest.raises(ValueError, match="visual_encodr.*nearest.*visual_encoder"):
        create_optimizer({"freeze": {"visual_encodr": 1}}, TinyAlbef())
    with pytest.raises(ValueError, match="has only 3 blocks"):
        create_optimizer({"freeze": {"visual_encoder": 4}}, TinyAlbef())
    with pytest.raises(ValueError, match="no block list"):
        create_optimizer({"freeze": {"vision_proj": 1}}, TinyAlbef())
    with pytest.raises(ValueError, match="lr_mult.*text_encodr.*text_encoder"):
        create_optimizer({"lr_mult": {"text_encodr": 0.1}}, TinyAlbef())
    with pytest.raises(ValueError, match="no trainable parameters"):
        create_optimizer({"freeze": {"visual_encoder": 0, "text_encoder": 0, "vision_proj": 0, "temp": 0}}, TinyAlbef())


@pytest.mark.parametrize("name", ["sgd", "lion", "lamb", "adafactor"])
def test_timm_optimizer_by_name_keeps_groups(name: str) -> None:
    torch.manual_seed(0)
    model = TinyAlbef()
    optimizer = create_optimizer({"name": name, "lr": 1e-2, "lr_mult": {"text_encoder": 0.5}}, model)
    assert type(optimizer).__name__.lower().startswith(name[:3])
    assert {group["lr_mult"] for group in optimizer.param_groups} == {1.0, 0.5}
    decay_names = {n for group, names in _names_by_group(optimizer, model) if group["weight_decay"] > 0 for n in names}
    assert decay_names == DECAY
    before = copy.deepcopy(model.vision_proj.weight.detach())
    model.vision_proj.weight.grad = torch.ones_like(model.vision_proj.weight)
    optimizer.step()
    assert not torch.equal(before, model.vision_proj.weight.detach())


def test_unknown_name_and_key_errors() -> None:
    with pytest.raises(ValueError, match="unknown optimizer.name 'adamww'.*valid names:.*adamw.*sgd"):
        create_optimizer({"name": "adamww"}, TinyAlbef())
    with pytest.raises(ValueError, match="optimizer.weight_decy.*weight_decay"):
        create_optimizer({"weight_decy": 0.1}, TinyAlbef())
    with pytest.raises(ValueError, match="fused"):
        create_optimizer({"fused": "yes"}, TinyAlbef())


def test_defaults_and_adamw_on_cpu() -> None:
    assert OPTIMIZER_DEFAULTS["name"] == "adamw" and OPTIMIZER_DEFAULTS["lr_mult"] == {}
    optimizer = create_optimizer(None, TinyAlbef())
    assert isinstance(optimizer, torch.optim.AdamW)
    group = optimizer.param_groups[0]
    assert group["fused"] is True  # auto (null): torch's fused kernel, on CPU as on CUDA
    assert create_optimizer({"fused": "auto"}, TinyAlbef()).param_groups[0]["fused"] is True
    assert create_optimizer({"fused": False}, TinyAlbef()).param_groups[0]["foreach"] is True
    assert create_optimizer({"fused": "true"}, TinyAlbef()).param_groups[0]["fused"] is True  # CPU fused kernel
    assert create_optimizer({"fused": False}, TinyAlbef()).param_groups[0]["fused"] is False
    frozen_temp = TinyAlbef()
    create_optimizer({"freeze": {"temp": 0}}, frozen_temp)
    assert not frozen_temp.temp.requires_grad
    assert group["betas"] == (0.9, 0.999) and group["eps"] == 1e-8
