"""Using a trained model: one call from a checkpoint to a ready model, and batched inference methods on it.

    from models import Predictor, load_model_and_transforms
    model, transform, tokenizer = load_model_and_transforms("output/retrieval/checkpoint_best.pth")
    predictor = Predictor.from_checkpoint("output/retrieval/checkpoint_best.pth")
    predictor.similarity(["cat.jpg", "dog.png"], ["a cat on a sofa", "a dog in the snow"])  # (2, 2)

Our checkpoints carry their config (``config``: the resolved YAML of the run); the task is read from the weights
(a ``text_decoder`` with / without a text encoder: VQA / captioning; an MLM head: pretraining; an ITM head:
retrieval), or from ``task`` in an exported ``.safetensors`` file. Official ALBEF files carry no config: the
matching ``configs/<Task>.yaml`` is used (or ``config=``), and ``task=`` where the weights do not tell (SNLI-VE,
NLVR2). ``task=`` also builds another task's model from a checkpoint through its documented key surgery, e.g. a
captioner or a VQA model from a pretraining checkpoint.

Images go in as paths, PIL images, uint8 numpy arrays (H, W, 3) / (H, W), uint8 tensors (3, H, W) or already
normalised float tensors (3, res, res); the transform is the evaluation pipeline (bicubic resize to image_res, no
crop) followed by the normalisation. Unreadable files raise ``dataset.transforms.ImageDecodeError`` naming the file.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from common.checkpoint_file import load_checkpoint_file
from common.config_file import read_config_file
from dataset.annotations import load_answer_list
from dataset.text import pre_caption, pre_question
from dataset.tokenizer import build_tokenizer, tokenize
from dataset.transforms import build_transform, load_image, normalize
from models.gradcam import GRADCAM_HEADS, CaptionGradCam, GradCamMaps, caption_gradcam, compute_gradcam, vqa_gradcam
from models.model_caption import AlbefCaption
from models.model_vqa import AlbefVQA

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
# The config used for an official ALBEF file (no config inside) of each task, unless config= is given.
TASK_CONFIGS: dict[str, str] = {
    "pretrain": "configs/Pretrain.yaml",
    "retrieval": "configs/Retrieval_coco.yaml",
    "grounding": "configs/Grounding.yaml",
    "vqa": "configs/VQA.yaml",
    "caption": "configs/Caption_coco.yaml",
    "ve": "configs/VE.yaml",
    "nlvr": "configs/NLVR.yaml",
    "nlvr_pretrain": "configs/Pretrain_nlvr.yaml",
}
DEFAULT_PROMPT = "a picture of "  # Caption.py's caption.prompt default
DEFAULT_K_TEST = 128  # VQA.py's eval.k_test default
DEFAULT_MAX_ANSWER_TOKENS = 10  # VQA.py's data.max_answer_tokens default

ImageInput = str | os.PathLike | np.ndarray | Tensor | Any  # Any: a PIL image


# ---- the checkpoint: task and config --------------------------------------------------------------------------------
def _weights(checkpoint: Mapping[str, Any]) -> Mapping[str, Any]:
    return checkpoint["model"] if isinstance(checkpoint.get("model"), Mapping) else checkpoint


def infer_task(checkpoint: Mapping[str, Any]) -> str | None:
    """The model task of a loaded checkpoint (``task`` of an exported file, else read from its config and weight
    names), or None where they do not tell (SNLI-VE and NLVR2 classifiers, foreign files)."""
    if checkpoint.get("task"):
        return str(checkpoint["task"])
    config = checkpoint.get("config")
    if isinstance(config, Mapping) and isinstance(config.get("caption"), Mapping):
        return "caption"
    keys = list(_weights(checkpoint))
    tops = {key.split(".", 1)[0] for key in keys}
    if "text_decoder" in tops:
        return "vqa" if "text_encoder" in tops else "caption"
    if tops & {"cls_head", "ta_head"}:
        return None
    if any(key.startswith("text_encoder.cls.") for key in keys):  # the MLM head
        return "pretrain"
    if "itm_head" in tops:
        return "retrieval"
    return None


def checkpoint_config(checkpoint: Mapping[str, Any], config: str | Path | Mapping[str, Any] | None = None,
                      task: str | None = None) -> dict[str, Any]:
    """The run config of a checkpoint: ``config`` (a mapping, or a task YAML with its ``base:`` files) when given,
    else the config our checkpoints carry, else (an official ALBEF file) ``TASK_CONFIGS[task]``. It must hold a
    ``model:`` block."""
    if isinstance(config, Mapping):
        merged, source = dict(config), "config="
    elif config:
        merged, source = read_config_file(config), str(config)
    elif isinstance(checkpoint.get("config"), Mapping):
        merged, source = dict(checkpoint["config"]), "the checkpoint's config"
    elif task in TASK_CONFIGS:
        source = str(REPO / TASK_CONFIGS[task])
        log.info("the checkpoint carries no config (an official ALBEF file?): using %s", source)
        merged = read_config_file(source)
    else:
        raise ValueError("the checkpoint carries no config (an official ALBEF file?) and its task is unknown: give "
                         f"task= (one of {sorted(TASK_CONFIGS)}) or config=, e.g. configs/Retrieval_coco.yaml")
    if not isinstance(merged.get("model"), Mapping):
        raise ValueError(f"{source} has no 'model:' block")
    return merged


def _local_path(value: str) -> str:
    """A relative file path of a config (bert_config, a vocab.txt tokenizer) that is not under the working directory
    but under the repository (configs/config_bert.json from another folder): the repository's file."""
    if value and not Path(value).is_absolute() and not Path(value).exists() and (REPO / value).exists():
        return str(REPO / value)
    return value


# ---- preprocessing --------------------------------------------------------------------------------------------------
def to_rgb_array(image: Any) -> np.ndarray:
    """uint8 (H, W, 3) RGB from a path, a PIL image, a uint8 numpy array ((H, W, 3), (H, W), (H, W, 4)) or a uint8
    tensor (3, H, W) / (H, W, 3)."""
    if isinstance(image, str | os.PathLike):
        return load_image(image)
    if isinstance(image, Tensor):
        if image.dtype != torch.uint8:
            raise ValueError(f"a float image tensor must be normalised (3, res, res); got {tuple(image.shape)}")
        image = image.detach().cpu()
        image = image.permute(1, 2, 0) if image.dim() == 3 and image.shape[0] == 3 else image
        image = image.numpy()
    elif not isinstance(image, np.ndarray):
        if hasattr(image, "convert") and hasattr(image, "size"):  # a PIL image, in whatever mode
            image = np.asarray(image.convert("RGB"))
        else:
            raise ValueError(f"unsupported image type {type(image).__name__}: give a path, a PIL image, a uint8 "
                             "numpy array (H, W, 3) or a tensor")
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image array, got {image.dtype} {image.shape} (scale to 0-255 first)")
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (3, 4) or 0 in image.shape:
        raise ValueError(f"expected an image array of shape (H, W, 3), got {image.shape}")
    return np.ascontiguousarray(image[:, :, :3])


@dataclass
class ImagePreprocess:
    """The evaluation transform of a model: ``transform(image) -> normalised float32 (3, res, res)`` for any
    accepted image (see the module docstring); ``transform.batch(images)`` stacks them (B, 3, res, res)."""

    image_res: int

    def __post_init__(self) -> None:
        self._resize = build_transform("test", self.image_res)

    def __call__(self, image: ImageInput) -> Tensor:
        if isinstance(image, Tensor) and image.is_floating_point():
            if tuple(image.shape) != (3, self.image_res, self.image_res):
                raise ValueError(f"a float image tensor is taken as normalised and must be (3, {self.image_res}, "
                                 f"{self.image_res}), got {tuple(image.shape)}")
            return image.float()
        pixels = self._resize(to_rgb_array(image), np.random.default_rng(0))  # uint8 (3, res, res); draws nothing
        return normalize(pixels)

    def batch(self, images: Sequence[ImageInput]) -> Tensor:
        return torch.stack([self(image) for image in images])


# ---- loading --------------------------------------------------------------------------------------------------------
@dataclass
class LoadedModel:
    """What `load_for_inference` builds: the model (eval mode, on its device and dtype), its image transform and
    tokenizer, the task it was built for and the run config it was built from."""

    model: nn.Module
    transform: ImagePreprocess
    tokenizer: Any
    task: str
    config: dict[str, Any] = field(default_factory=dict)


def load_for_inference(checkpoint: str | Path | Mapping[str, Any], task: str | None = None,
                       config: str | Path | Mapping[str, Any] | None = None, device: str | torch.device = "cpu",
                       dtype: torch.dtype | None = None, tokenizer: Any = None,
                       allow_partial: bool = False) -> LoadedModel:
    """See `load_model_and_transforms`; also returns the task and the config."""
    from models import MODEL_REGISTRY, create_model, load_checkpoint_detailed, optional_checkpoint_keys

    source = str(checkpoint) if isinstance(checkpoint, str | Path) else "the checkpoint"
    raw = load_checkpoint_file(checkpoint) if isinstance(checkpoint, str | Path) else dict(checkpoint)
    found = infer_task(raw)
    task = task or found
    if task is None:
        raise ValueError(f"{source}: the task cannot be read from its weights (a classifier head: SNLI-VE or NLVR2?); "
                         f"give task=, one of {sorted(MODEL_REGISTRY)}")
    if task not in MODEL_REGISTRY:
        raise ValueError(f"unknown task {task!r}; known: {sorted(MODEL_REGISTRY)}")
    run_config = checkpoint_config(raw, config, task)
    model_cfg = dict(run_config["model"])
    if task == "caption" and model_cfg.get("arch", "albef_decoder") != "albef_decoder":
        raise ValueError(f"{source}: a {model_cfg['arch']!r} captioner; this loader builds the ALBEF-decoder "
                         "captioner (model.arch albef_decoder) only: use Caption.py --evaluate for the others")
    model_cfg["bert_config"] = _local_path(str(model_cfg.get("bert_config", "configs/config_bert.json")))
    model_cfg["text_encoder"] = ""  # the checkpoint holds the text encoder: nothing to download
    model_cfg["vit"] = {**dict(model_cfg.get("vit") or {}), "pretrained": ""}
    # Training-time memory savers (same maths): nothing to save without a backward pass over the whole model.
    model_cfg["memory_efficient"] = False
    model_cfg["grad_checkpointing"] = False
    if tokenizer is None or isinstance(tokenizer, str | Path):
        tokenizer = build_tokenizer(_local_path(str(tokenizer or model_cfg.get("tokenizer", "bert-base-uncased"))))
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device}: CUDA is not available on this machine; use device='cpu'")
    model = create_model(task, model_cfg, tokenizer=tokenizer)
    done = load_checkpoint_detailed(model, _weights(raw))
    optional = optional_checkpoint_keys(model)
    needed = [key for key in done.missing if key not in optional]
    if needed and not allow_partial:
        raise ValueError(f"{source} does not fill the {task} model: {len(needed)} weight tensors missing (e.g. "
                         f"{needed[:4]}); is task={task!r} right? (allow_partial=True keeps their random init)")
    if needed:
        log.warning("%s: %d weight tensors keep their random init: %s", source, len(needed), needed[:10])
    momentum = tuple(f"{name_m}." for _, name_m in getattr(model, "momentum_pairs", ()))
    if momentum and any(key.startswith(momentum) for key in done.missing):
        model.copy_params_to_momentum()  # an exported file has no momentum copies: they follow the loaded weights
    model = model.to(device=device, dtype=dtype).eval()
    return LoadedModel(model, ImagePreprocess(int(model.cfg["image_res"])), tokenizer, task, run_config)


def load_model_and_transforms(checkpoint: str | Path | Mapping[str, Any], task: str | None = None,
                              config: str | Path | Mapping[str, Any] | None = None,
                              device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                              tokenizer: Any = None) -> tuple[nn.Module, ImagePreprocess, Any]:
    """``(model, transform, tokenizer)`` from a checkpoint (a .pth file, an exported .safetensors file, or a loaded
    dict), ready for inference: eval mode, on ``device`` in ``dtype`` (None: as stored, float32).

    ``task`` (see models.MODEL_REGISTRY) is read from the checkpoint where it can be; ``config`` (a mapping or a task
    YAML) replaces the config the checkpoint carries; ``tokenizer`` (an object, a hub name or a vocab.txt) replaces
    ``model.tokenizer`` of the config. ``transform(image)`` gives the normalised (3, res, res) tensor. Weights the
    model needs and the checkpoint lacks are a ValueError (a checkpoint of another task or model config)."""
    loaded = load_for_inference(checkpoint, task, config, device, dtype, tokenizer)
    return loaded.model, loaded.transform, loaded.tokenizer


# ---- inference ------------------------------------------------------------------------------------------------------
def _chunks(count: int, size: int) -> Iterator[slice]:
    for start in range(0, count, size):
        yield slice(start, min(start + size, count))


def _as_list(items: Any, what: str) -> list[Any]:
    if isinstance(items, str | os.PathLike) or (isinstance(items, Tensor | np.ndarray) and items.ndim in (2, 3)):
        return [items]  # one image (or one text)
    if isinstance(items, Tensor | np.ndarray) and items.ndim == 4:
        return list(items)  # a batch: (B, 3, H, W) tensor or (B, H, W, 3) array
    if hasattr(items, "convert") and hasattr(items, "size"):  # one PIL image
        return [items]
    items = list(items)
    if not items:
        raise ValueError(f"no {what} given")
    return items


def _broadcast(images: list[Any], texts: list[str]) -> tuple[list[Any], list[str]]:
    if len(images) == len(texts):
        return images, texts
    if len(images) == 1:
        return images * len(texts), texts
    if len(texts) == 1:
        return images, texts * len(images)
    raise ValueError(f"{len(images)} images and {len(texts)} texts: give as many of each (pairs), or one of either")


class Predictor:
    """Batched inference on a loaded model: features, similarities, ITM matching, captions, VQA answers, Grad-CAM.

    ``Predictor.from_checkpoint(path)`` loads a checkpoint (see `load_model_and_transforms`); ``Predictor(model,
    transform, tokenizer, config)`` wraps a model already loaded. Text is cleaned as in training (ALBEF's
    pre_caption / pre_question, ``data.max_words`` words, ``data.max_tokens`` tokens of the config). Results are
    float32 CPU tensors. A method the loaded model has no head for raises a ValueError saying which task has it."""

    def __init__(self, model: nn.Module, transform: ImagePreprocess, tokenizer: Any,
                 config: Mapping[str, Any] | None = None, batch_size: int = 32) -> None:
        self.model = model.eval()
        self.transform = transform
        self.tokenizer = tokenizer
        self.config = dict(config or {})
        data = dict(self.config.get("data") or {})
        self.max_words = int(data.get("max_words", 30))
        self.max_tokens = int(data.get("max_tokens", 30))
        self.batch_size = int(batch_size)
        parameter = next(model.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path | Mapping[str, Any], task: str | None = None,
                        config: str | Path | Mapping[str, Any] | None = None, device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None, tokenizer: Any = None, batch_size: int = 32) -> Predictor:
        loaded = load_for_inference(checkpoint, task, config, device, dtype, tokenizer)
        return cls(loaded.model, loaded.transform, loaded.tokenizer, loaded.config, batch_size)

    @property
    def task_name(self) -> str:
        return type(self.model).__name__

    def _need(self, what: str, ok: bool, tasks: str) -> None:
        if not ok:
            raise ValueError(f"{what} needs a {tasks} checkpoint; the loaded model is {self.task_name}")

    # ---- inputs
    def images_tensor(self, images: Sequence[ImageInput]) -> Tensor:
        """Normalised (B, 3, res, res) on the model's device and dtype."""
        return self.transform.batch(images).to(self.device, self.dtype)

    def tokens(self, texts: Sequence[str], clean: Any = pre_caption, max_tokens: int | None = None,
                add_eos: bool = False) -> tuple[Tensor, Tensor]:
        if any(not isinstance(text, str) for text in texts):
            raise ValueError("texts must be strings")
        cleaned = [clean(text, self.max_words) for text in texts]
        ids, mask = tokenize(self.tokenizer, cleaned, max_tokens or self.max_tokens, add_eos=add_eos)
        return ids.to(self.device), mask.to(self.device)

    # ---- ITC / ITM
    @torch.no_grad()
    def image_features(self, images: Any, return_embeds: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """L2-normalised ITC image features (N, embed_dim); with ``return_embeds`` also the image encoder's tokens
        (N, 1 + patches, width)."""
        self._need("image_features", hasattr(self.model, "vision_proj"), "pretraining / retrieval / grounding")
        images = _as_list(images, "images")
        feats, embeds = [], []
        for part in _chunks(len(images), self.batch_size):
            image_embeds = self.model.encode_image(self.images_tensor(images[part]))
            feats.append(self.model.image_feat(image_embeds).float().cpu())
            if return_embeds:
                embeds.append(image_embeds.float().cpu())
        return (torch.cat(feats), torch.cat(embeds)) if return_embeds else torch.cat(feats)

    @torch.no_grad()
    def text_features(self, texts: Any, return_embeds: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """L2-normalised ITC text features (N, embed_dim); with ``return_embeds`` also the text encoder's [CLS]
        embedding (N, width)."""
        self._need("text_features", hasattr(self.model, "text_proj"), "pretraining / retrieval / grounding")
        texts = _as_list(texts, "texts")
        feats, embeds = [], []
        for part in _chunks(len(texts), self.batch_size):
            text_embeds = self.model.encode_text(*self.tokens(texts[part]))
            feats.append(self.model.text_feat(text_embeds).float().cpu())
            if return_embeds:
                embeds.append(text_embeds[:, 0].float().cpu())
        return (torch.cat(feats), torch.cat(embeds)) if return_embeds else torch.cat(feats)

    def similarity(self, images: Any, texts: Any) -> Tensor:
        """ITC similarity of every image with every text: cosine / temperature (N_images, N_texts)."""
        image_feat = self.image_features(images)
        text_feat = self.text_features(texts)
        return image_feat @ text_feat.T / float(self.model.temp.detach())

    @torch.no_grad()
    def match(self, images: Any, texts: Any) -> Tensor:
        """ITM probability that each (image, text) pair matches (N,): image i with text i, or one image with every
        text, or one text with every image."""
        self._need("match", hasattr(self.model, "itm_head"), "pretraining / retrieval / grounding")
        images, texts = _broadcast(_as_list(images, "images"), _as_list(texts, "texts"))
        probs = []
        for part in _chunks(len(texts), self.batch_size):
            ids, mask = self.tokens(texts[part])
            image_embeds = self.model.encode_image(self.images_tensor(images[part]))
            fused = self.model.fuse(self.model.encode_text(ids, mask), mask, image_embeds)
            probs.append(self.model.itm_head(fused[:, 0, :]).float().softmax(dim=-1)[:, 1].cpu())
        return torch.cat(probs)

    # ---- captioning and VQA
    @torch.no_grad()
    def caption(self, images: Any, prompt: str | None = None, seed: int = 0,
                **generation: Any) -> list[str] | list[list[str]]:
        """One caption per image (a list of ``num_return_sequences`` captions per image when that is > 1).
        ``generation``: models.generation.GenerationSettings fields (num_beams, max_length, sample, ...) over the
        config's ``generation:`` block; ``prompt``: the decoder's context (default: the config's caption.prompt)."""
        from models.generation import GenerationSettings

        self._need("caption", isinstance(self.model, AlbefCaption), "captioning (Caption.py, or task='caption')")
        settings = GenerationSettings.from_config({**dict(self.config.get("generation") or {}), **generation})
        prompt = prompt if prompt is not None else (self.config.get("caption") or {}).get("prompt", DEFAULT_PROMPT)
        context, _ = tokenize(self.tokenizer, [prompt.strip()], max_length=512)
        context = context[0].to(self.device)
        generator = torch.Generator(device=self.device).manual_seed(seed)
        images = _as_list(images, "images")
        captions: list[str] = []
        for part in _chunks(len(images), self.batch_size):
            tokens = self.model.generate(self.images_tensor(images[part]), context, settings, generator=generator)
            captions += [text.strip() for text in self.tokenizer.batch_decode(tokens.tolist(),
                                                                              skip_special_tokens=True)]
        count = settings.num_return_sequences
        return captions if count == 1 else [captions[i:i + count] for i in range(0, len(captions), count)]

    def _answer_list(self, answer_list: Sequence[str] | str | Path | None) -> list[str]:
        if answer_list is None:
            path = (self.config.get("data") or {}).get("answer_list")
            if not path:
                raise ValueError("answer() ranks a list of candidate answers: give answer_list= (a list of strings "
                                 "or ALBEF's answer_list.json); the config has no data.answer_list")
            answer_list = path
        if isinstance(answer_list, str | Path):
            return load_answer_list(answer_list)
        answers = list(answer_list)
        if not answers or any(not isinstance(answer, str) for answer in answers):
            raise ValueError("answer_list must be a non-empty list of answer strings")
        return answers

    @torch.no_grad()
    def answer(self, images: Any, questions: Any, answer_list: Sequence[str] | str | Path | None = None,
               k: int | None = None) -> list[str]:
        """The best answer of ``answer_list`` (default: the config's data.answer_list) to each (image, question)
        pair, ranked as VQA.py evaluates: the decoder's first token picks ``k`` candidates (default eval.k_test),
        their full likelihood re-ranks them."""
        self._need("answer", isinstance(self.model, AlbefVQA), "VQA (VQA.py, or task='vqa')")
        answers = self._answer_list(answer_list)
        k = int(k or (self.config.get("eval") or {}).get("k_test", DEFAULT_K_TEST))
        max_answer = int((self.config.get("data") or {}).get("max_answer_tokens", DEFAULT_MAX_ANSWER_TOKENS))
        answer_ids, answer_mask = tokenize(self.tokenizer, answers, max_answer, add_eos=True)  # (A, La)
        answer_ids, answer_mask = answer_ids.to(self.device), answer_mask.to(self.device)
        images, questions = _broadcast(_as_list(images, "images"), _as_list(questions, "questions"))
        best: list[str] = []
        for part in _chunks(len(questions), self.batch_size):
            ids, mask = self.tokens(questions[part], clean=pre_question)
            states = self.model.encode_question(self.images_tensor(images[part]), ids, mask)
            topk_ids, _ = self.model.rank_answers(states, mask, answer_ids, answer_mask, k)  # (B, k)
            best += [answers[index] for index in topk_ids[:, 0].tolist()]
        return best

    # ---- Grad-CAM
    def gradcam(self, image: ImageInput, text: str | None = None, head: str = "itm", block_num: int | None = None,
                answer: str | None = None, answer_list: Sequence[str] | str | Path | None = None,
                prompt: str | None = None, vit_block: int = -1, **generation: Any) -> GradCamMaps | CaptionGradCam:
        """Grad-CAM of one image on the patch grid (models.gradcam), for ``head``:

        - 'itm' (pretraining / retrieval / grounding): the ITM match logit of ``text`` through a fusion layer's
          cross-attention: a map per token (``token_maps``) and for the whole text (``text_map``);
        - 'itc': the image-text similarity of ``text`` through an image encoder block's attention (``vit_block``,
          the last by default) (``text_map``);
        - 'caption' (a captioning model): ``text`` is the caption to explain (None: the one it generates with
          ``prompt`` and ``generation``) -> CaptionGradCam: a map per caption token;
        - 'vqa' (a VQA model): ``text`` is the question, ``answer`` the answer to explain (None: the model's best of
          ``answer_list``) -> the answer's map (``text_map``) and each question token's (``token_maps``)."""
        if head not in GRADCAM_HEADS:
            raise ValueError(f"gradcam head must be one of {GRADCAM_HEADS}, got {head!r}")
        if head == "caption":
            return self._caption_gradcam(image, text, block_num, prompt, **generation)
        if not text:
            raise ValueError(f"gradcam head {head!r} needs a text ({'the question' if head == 'vqa' else 'a caption'})")
        if head == "vqa":
            self._need("gradcam head 'vqa'", isinstance(self.model, AlbefVQA), "VQA (VQA.py, or task='vqa')")
            if answer is None:
                answer = self.answer([image], [text], answer_list=answer_list)[0]
            max_answer = int((self.config.get("data") or {}).get("max_answer_tokens", DEFAULT_MAX_ANSWER_TOKENS))
            answer_ids, answer_mask = tokenize(self.tokenizer, [answer], max_answer, add_eos=True)
            ids, mask = self.tokens([text], clean=pre_question)
            return vqa_gradcam(self.model, self.images_tensor([image]), ids, mask, answer_ids.to(self.device),
                               answer_mask.to(self.device), block_num)
        self._need(f"gradcam head {head!r}", hasattr(self.model, "itm_head"), "pretraining / retrieval / grounding")
        ids, mask = self.tokens([text])
        return compute_gradcam(self.model, self.images_tensor([image]), ids, mask, head, block_num, vit_block)

    def _caption_gradcam(self, image: ImageInput, caption: str | None, block_num: int | None, prompt: str | None,
                         **generation: Any) -> CaptionGradCam:
        self._need("gradcam head 'caption'", isinstance(self.model, AlbefCaption),
                   "captioning (Caption.py, or task='caption')")
        prompt = prompt if prompt is not None else (self.config.get("caption") or {}).get("prompt", DEFAULT_PROMPT)
        if caption is None:
            caption = self.caption([image], prompt=prompt, **{**generation, "num_return_sequences": 1})[0]
        context, _ = tokenize(self.tokenizer, [prompt.strip()], max_length=512)  # [CLS] + the prompt's pieces
        pieces = self.tokenizer(pre_caption(caption, self.max_words), add_special_tokens=False)["input_ids"]
        if not pieces:
            raise ValueError(f"nothing to explain: the caption {caption!r} has no tokens")
        ids = torch.tensor([context[0].tolist() + pieces], device=self.device)
        return caption_gradcam(self.model, self.images_tensor([image]), ids, torch.ones_like(ids),
                               context.shape[1], block_num)
