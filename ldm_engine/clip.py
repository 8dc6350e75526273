"""A whole CLIP (Radford et al. 2021): text and image towers in one embedding space.

CLIP maps a caption through its text transformer (pooled at the EOS token, then a linear
projection W_t) and an image through its vision transformer (pooled at the class token, then W_i)
into one space, where matching pairs have a high cosine. Everything built on it here reads that
cosine:

* similarity:  cos(i, t) = <f_i / |f_i|, g_t / |g_t|>                       (N_img, N_txt)
* CLIP score (Hessel et al. 2021, as torchmetrics computes it): 100 * max(cos(i_k, t_k), 0)
* zero-shot classification (Radford et al. 2021, Sec. 3.1.4): a label's embedding is the
  re-normalised mean of its prompt templates' embeddings ("prompt ensembling"), and
  p(label | image) = softmax_l(tau^-1 * cos(i, t_l)), with tau^-1 = exp(logit_scale) the learnt
  inverse temperature the contrastive loss was trained with.

A ``ClipModel`` comes from any local source (``load_clip``): a model folder that carries its CLIP
(``image_encoder/`` + ``text_projection/`` beside the SD text encoder; ``save_clip_towers``
writes them), a transformers ``CLIPModel`` folder, or an open_clip checkpoint file (converted in
``clip_open_clip``; the folder readers are in ``clip_load``). Nothing is ever fetched from a
model hub.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import safetensors.torch
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import CLIPModel, CLIPVisionConfig, PreTrainedTokenizerBase

from .config_check import read_config_file
from .errors import ModelFolderError, UserInputError
from .fsutil import atomic_dir, write_bytes_atomic

IMAGE_ENCODER = "image_encoder"
FEATURE_EXTRACTOR = "feature_extractor"
TEXT_PROJECTION = "text_projection"
# What a model folder's model_index.json lists for its CLIP towers (StableDiffusionPipeline takes
# both as optional components; text_projection/ is ours and diffusers ignores it).
MODEL_INDEX_ENTRIES = {IMAGE_ENCODER: ["transformers", "CLIPVisionModelWithProjection"],
                       FEATURE_EXTRACTOR: ["transformers", "CLIPImageProcessor"]}
# How features that need an image tower tell the user where to get one.
NEEDS_CLIP_HINT = ("reranking, zero-shot classification and CLIP scores need one: pass a CLIP "
                   "with --clip PATH (a transformers CLIPModel folder, or an open_clip "
                   ".safetensors/.pt file)")
# Inputs per forward pass: bounds activation memory whatever the number of prompts or images.
_TEXT_BATCH = 256
_IMAGE_BATCH = 32


def image_processor_class():
    """transformers' PIL-backed CLIP image processor: ``CLIPImageProcessorPil`` in transformers
    5 (where plain ``CLIPImageProcessor`` is the torchvision backend when torchvision is
    installed), ``CLIPImageProcessor`` in older releases, where that is the PIL one."""
    import transformers

    return getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor


def make_image_processor(*, image_size: int, image_mean: Sequence[float],
                         image_std: Sequence[float], resample: int = 3):
    """CLIP's eval transform: shortest edge to image_size (PIL bicubic by default), centre crop
    to image_size^2, pixels/255, then (x - mean) / std per channel."""
    return image_processor_class()(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
        image_mean=list(image_mean), image_std=list(image_std), resample=resample,
        do_resize=True, do_center_crop=True, do_rescale=True, do_normalize=True,
        do_convert_rgb=True)


# --- input checks: one clear line, before any compute ------------------------------------------

Images = Sequence[Image.Image] | Image.Image | torch.Tensor


def _check_texts(texts, what: str = "texts") -> list[str]:
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, Sequence):
        raise UserInputError(f"{what} must be a list of strings, got {type(texts).__name__}")
    texts = list(texts)
    if not texts:
        raise UserInputError(f"no {what} given")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise UserInputError(f"{what}[{i}] is a {type(t).__name__}, not a string")
    return texts


def _check_images(images) -> list[Image.Image] | torch.Tensor:
    """PIL images (a list) or a (B, 3, H, W) / (3, H, W) float tensor of pixels in [0, 1]."""
    if isinstance(images, torch.Tensor):
        x = images.unsqueeze(0) if images.ndim == 3 else images
        if x.ndim != 4 or x.shape[1] != 3:
            raise UserInputError(f"image tensor must be (B, 3, H, W) pixels, got shape "
                                 f"{tuple(images.shape)}")
        if x.shape[0] == 0 or x.shape[2] == 0 or x.shape[3] == 0:
            raise UserInputError(f"image tensor is empty: shape {tuple(images.shape)}")
        if not x.is_floating_point():
            raise UserInputError(f"image tensor must hold floating-point pixels in [0, 1], got "
                                 f"{str(x.dtype).removeprefix('torch.')} (divide 8-bit pixels "
                                 "by 255)")
        if not bool(torch.isfinite(x).all()):
            raise UserInputError("image tensor holds inf or NaN pixels")
        lo, hi = float(x.min()), float(x.max())
        if lo < 0.0 or hi > 1.0:
            raise UserInputError(f"image tensor pixels must lie in [0, 1], got [{lo:.3g}, "
                                 f"{hi:.3g}] (map [-1, 1] decoder output with (x + 1) / 2)")
        return x
    if isinstance(images, Image.Image):
        return [images]
    if not isinstance(images, Sequence) or isinstance(images, (str, bytes)):
        raise UserInputError(f"images must be PIL images or a pixel tensor, got "
                             f"{type(images).__name__}")
    images = list(images)
    if not images:
        raise UserInputError("no images given")
    for i, im in enumerate(images):
        if not isinstance(im, Image.Image):
            raise UserInputError(f"images[{i}] is a {type(im).__name__}, not a PIL image")
        if im.width == 0 or im.height == 0:
            raise UserInputError(f"images[{i}] is empty ({im.width}x{im.height})")
    return images


def _count(images) -> int:
    return images.shape[0] if isinstance(images, torch.Tensor) else len(images)


def check_labels(labels, templates) -> tuple[list[str], list[str]]:
    """Zero-shot labels and prompt templates, checked: one line for the first thing wrong."""
    if isinstance(labels, str):
        raise UserInputError("labels must be a list of label strings, not one string (split "
                             "\"a,b,c\" on commas first)")
    labels = _check_texts(labels, "labels")
    cleaned = [label.strip() for label in labels]
    for i, label in enumerate(cleaned):
        if not label:
            raise UserInputError(f"labels[{i}] is empty")
    seen: dict[str, int] = {}
    for i, label in enumerate(cleaned):
        if label in seen:
            raise UserInputError(f"label {label!r} is given twice (labels[{seen[label]}] and "
                                 f"labels[{i}])")
        seen[label] = i
    if isinstance(templates, str):
        templates = [templates]
    templates = _check_texts(templates, "templates")
    for t in templates:
        if "{}" not in t:
            raise UserInputError(f"template {t!r} has no {{}} where the label goes, e.g. "
                                 "\"a photo of {}\"")
    return cleaned, templates


# --- the model ---------------------------------------------------------------------------------

class ClipModel:
    """Two CLIP towers in one embedding space, from any local source; read-only, thread-safe.

    Holds the text tower (pooled at EOS) with its projection W_t, the vision tower (pooled at
    the class token) with W_i, the inverse temperature exp(logit_scale), a tokenizer and the
    image processor. Every method runs under ``torch.inference_mode`` and changes nothing, so
    one instance may serve concurrent requests. Embeddings come back as float32 on the model's
    device, L2-normalised, whatever dtype the towers run in.
    """

    def __init__(self, *, text_model: torch.nn.Module, text_projection: torch.nn.Module,
                 vision_model: torch.nn.Module, visual_projection: torch.nn.Module,
                 logit_scale: float, tokenizer, processor, name: str = ""):
        """Prefer ``from_transformers`` or ``load_clip``. text_model(input_ids) and
        vision_model(pixel_values) must return outputs with a ``pooler_output``."""
        self.name = name
        self._text = text_model.eval().requires_grad_(False)
        self._text_projection = text_projection.eval().requires_grad_(False)
        self._vision = vision_model.eval().requires_grad_(False)
        self._visual_projection = visual_projection.eval().requires_grad_(False)
        self.logit_scale = float(logit_scale)
        self.tokenizer = tokenizer
        self.processor = processor
        param = next(self._vision.parameters())
        self.device: torch.device = param.device
        self.dtype: torch.dtype = param.dtype
        config = getattr(self._text, "config", None)
        self.context_length: int = int(getattr(config, "max_position_embeddings", 77))
        length = self._tokenizer_length()
        if length is not None and length > self.context_length:
            raise ModelFolderError(f"CLIP {name or '(in memory)'}: its tokenizer makes rows of "
                                   f"{length} tokens, its text tower has {self.context_length} "
                                   "positions")

    @classmethod
    def from_transformers(cls, model: CLIPModel, tokenizer, processor, name: str = "") -> ClipModel:
        """Wrap a transformers ``CLIPModel`` (used as is: not copied, put in eval mode).

        tokenizer: anything with ``SDTokenizer``'s call contract (list of str -> (N, L) int64
        ids), or a transformers tokenizer (padded to its max length, truncated keeping EOS).
        processor: a transformers CLIP image processor (``make_image_processor`` makes one).
        """
        if not isinstance(model, CLIPModel):
            raise TypeError(f"expected a transformers CLIPModel, got {type(model).__name__}")
        return cls(text_model=model.text_model, text_projection=model.text_projection,
                   vision_model=model.vision_model, visual_projection=model.visual_projection,
                   logit_scale=math.exp(float(model.logit_scale.detach())), tokenizer=tokenizer,
                   processor=processor, name=name)

    def __repr__(self) -> str:
        return (f"ClipModel({self.name!r}, embed_dim={self.embed_dim}, device={self.device}, "
                f"dtype={str(self.dtype).removeprefix('torch.')})")

    @property
    def embed_dim(self) -> int:
        return int(self._visual_projection.weight.shape[0])

    # --- embeddings ---

    def _tokenizer_length(self) -> int | None:
        if isinstance(self.tokenizer, PreTrainedTokenizerBase):
            length = self.tokenizer.model_max_length
            return min(int(length), self.context_length) if length < 10**6 else None
        length = getattr(self.tokenizer, "max_length", None)
        return int(length) if isinstance(length, int) else None

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, L) int64 ids, L at most the text tower's context length."""
        if isinstance(self.tokenizer, PreTrainedTokenizerBase):
            length = self._tokenizer_length() or self.context_length
            return self.tokenizer(list(texts), padding="max_length", max_length=length,
                                  truncation=True, return_tensors="pt")["input_ids"]
        return self.tokenizer(list(texts))

    def _pad_id(self) -> int | None:
        pad = getattr(self.tokenizer, "pad_id", None)
        if pad is None:
            pad = getattr(self.tokenizer, "pad_token_id", None)
        return pad

    def _trimmed(self, ids: torch.Tensor) -> torch.Tensor:
        """ids cut just past the last non-pad token of the longest row (plus one position).

        The text tower is causal and pools at the EOS token, which is at most one position
        after a row's last non-pad token (with EOS padding the pad *is* EOS), so the positions
        cut off cannot change the embedding: same result, 3-7x less work than 77 positions.
        """
        pad = self._pad_id()
        if pad is None:
            return ids
        real = (ids != pad).any(0).nonzero()
        keep = min(int(real.max()) + 2 if real.numel() else 1, ids.shape[1])
        return ids[:, :keep]

    @torch.inference_mode()
    def text_embeds(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, P) float32 unit vectors: W_t applied to the text tower's EOS state."""
        texts = _check_texts(texts)
        out = []
        for start in range(0, len(texts), _TEXT_BATCH):
            ids = self._trimmed(self.tokenize(texts[start:start + _TEXT_BATCH]))
            pooled = self._text(input_ids=ids.to(self.device)).pooler_output    # (n, H)
            out.append(self._text_projection(pooled).float())                  # (n, P)
        return F.normalize(torch.cat(out), dim=-1)

    def pixel_values(self, images: Images) -> torch.Tensor:
        """The vision tower's input (N, 3, S, S): the image processor's transform of the PIL
        images, or of a [0, 1] pixel tensor rounded to the 8-bit images it stands for (what a
        pipeline returns and a PNG holds), so both inputs take exactly one path."""
        images = _check_images(images)
        if isinstance(images, torch.Tensor):
            arr = (images.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype("uint8")
            images = [Image.fromarray(a) for a in arr]
        return self.processor(images=[im.convert("RGB") for im in images],
                              return_tensors="pt")["pixel_values"]

    @torch.inference_mode()
    def image_embeds(self, images: Images) -> torch.Tensor:
        """(N, P) float32 unit vectors: W_i applied to the vision tower's class-token state."""
        images = _check_images(images)
        out = []
        for start in range(0, _count(images), _IMAGE_BATCH):
            pixels = self.pixel_values(images[start:start + _IMAGE_BATCH])
            pixels = pixels.to(device=self.device, dtype=self.dtype)
            pooled = self._vision(pixel_values=pixels).pooler_output             # (n, H)
            out.append(self._visual_projection(pooled).float())                # (n, P)
        return F.normalize(torch.cat(out), dim=-1)

    # --- what is built on them ---

    def similarity(self, images: Images, texts: Sequence[str]) -> torch.Tensor:
        """(N_img, N_txt) cosine similarities."""
        images, texts = _check_images(images), _check_texts(texts)
        return self.image_embeds(images) @ self.text_embeds(texts).T

    def score(self, images: Images, texts: str | Sequence[str]) -> torch.Tensor:
        """(N,) CLIP score of image k against text k: 100 * max(cos, 0) (Hessel et al. 2021,
        Eq. 1 with w = 100, as torchmetrics' CLIPScore). One string scores every image."""
        images = _check_images(images)
        n = _count(images)
        texts = [texts] * n if isinstance(texts, str) else _check_texts(texts)
        if len(texts) != n:
            raise UserInputError(f"CLIP score pairs images with texts: got {n} images and "
                                 f"{len(texts)} texts")
        unique = list(dict.fromkeys(texts))
        t = self.text_embeds(unique)[torch.tensor([unique.index(x) for x in texts])]
        cos = (self.image_embeds(images) * t).sum(-1)
        return 100.0 * cos.clamp(min=0.0)

    def label_embeds(self, labels: Sequence[str],
                     templates: Sequence[str] = ("{}",)) -> torch.Tensor:
        """(N_labels, P) zero-shot classifier weights: per label, the mean of its templates'
        unit text embeddings, re-normalised (Radford et al. 2021, Sec. 3.1.4)."""
        labels, templates = check_labels(labels, templates)
        prompts = [t.replace("{}", label) for label in labels for t in templates]
        e = self.text_embeds(prompts).view(len(labels), len(templates), -1)   # (L, T, P)
        return F.normalize(e.mean(1), dim=-1)

    def classify(self, images: Images, labels: Sequence[str],
                 templates: Sequence[str] = ("{}",)) -> torch.Tensor:
        """(N_img, N_labels) probabilities: softmax over labels of exp(logit_scale) * cos."""
        labels, templates = check_labels(labels, templates)
        images = _check_images(images)
        weights = self.label_embeds(labels, templates)
        logits = self.logit_scale * (self.image_embeds(images) @ weights.T)
        return logits.softmax(-1)


# --- a model folder's CLIP towers --------------------------------------------------------------

def _save_state(state: dict[str, torch.Tensor], file: Path) -> None:
    # transformers refuses safetensors files whose metadata does not name the framework.
    safetensors.torch.save_file({k: v.detach().contiguous() for k, v in state.items()}, str(file),
                                metadata={"format": "pt"})


def save_clip_towers(model: CLIPModel, folder: str | os.PathLike, *, image_size: int,
                     image_mean: Sequence[float], image_std: Sequence[float]) -> None:
    """Write ``image_encoder/``, ``feature_extractor/`` and ``text_projection/`` into folder.

    The text tower itself is the folder's ``text_encoder/`` (written by the caller, e.g.
    ``components.save_text_encoder``). Each subfolder is written atomically; a model_index.json
    already in folder gets the two components listed (``MODEL_INDEX_ENTRIES``).
    image_mean/image_std: what the towers were trained on, e.g. 0.5/0.5 for pixels in [-1, 1].
    """
    folder = Path(folder)
    if len(image_mean) != 3 or len(image_std) != 3 or min(image_std) <= 0:
        raise ValueError("image_mean and image_std need 3 values, std positive")
    vision = CLIPVisionConfig.from_dict(model.config.vision_config.to_dict())
    vision.projection_dim = model.config.projection_dim
    vision.architectures = ["CLIPVisionModelWithProjection"]
    vision.dtype = torch.float32       # as text_encoder/: loads in float32 unless told otherwise
    with atomic_dir(folder / IMAGE_ENCODER, overwrite=True) as tmp:
        vision.save_pretrained(tmp)
        state = {f"vision_model.{k}": v for k, v in model.vision_model.state_dict().items()}
        state["visual_projection.weight"] = model.visual_projection.weight
        _save_state(state, tmp / "model.safetensors")
    with atomic_dir(folder / FEATURE_EXTRACTOR, overwrite=True) as tmp:
        make_image_processor(image_size=image_size, image_mean=image_mean,
                             image_std=image_std).save_pretrained(tmp)
    weight = model.text_projection.weight                                  # (P, H)
    with atomic_dir(folder / TEXT_PROJECTION, overwrite=True) as tmp:
        config = {"in_features": int(weight.shape[1]), "out_features": int(weight.shape[0])}
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        _save_state({"weight": weight, "logit_scale": model.logit_scale.detach().reshape(())},
                    tmp / "model.safetensors")
    index = folder / "model_index.json"
    if index.is_file():
        entries = read_config_file(index)
        entries.update(MODEL_INDEX_ENTRIES)
        write_bytes_atomic(index, (json.dumps(entries, indent=2) + "\n").encode())


def has_clip(folder: str | os.PathLike) -> bool:
    """Whether ``load_clip(folder)`` finds a whole CLIP there without converting anything: a
    model folder with its image tower (image_encoder/ + text_projection/ + text_encoder/), or a
    transformers CLIPModel folder. Reads two small files at most; never raises."""
    root = Path(folder)
    try:
        if not root.is_dir():
            return False
        if (root / IMAGE_ENCODER).is_dir():
            return all((root / rel).is_file() for rel in TOWER_FILES)
        if (root / "config.json").is_file():
            return _is_clip_model_config(read_config_file(root / "config.json"))
    except (OSError, UserInputError):
        return False
    return False


TOWER_FILES = (f"{IMAGE_ENCODER}/config.json", f"{IMAGE_ENCODER}/model.safetensors",
                f"{TEXT_PROJECTION}/config.json", f"{TEXT_PROJECTION}/model.safetensors",
                "text_encoder/config.json", "text_encoder/model.safetensors")


def _is_clip_model_config(config: dict) -> bool:
    return config.get("model_type") == "clip" or "CLIPModel" in (config.get("architectures") or [])


def load_clip(source: str | os.PathLike, *, device: str | torch.device = "cpu",
              dtype: torch.dtype = torch.float32, arch: str | None = None,
              trust_pickle: bool = False) -> ClipModel:
    """A CLIP from local disk; nothing is downloaded.

    source is one of:
    (a) a model folder carrying its CLIP: image_encoder/ + text_projection/ + text_encoder/ +
        tokenizer/ (+ feature_extractor/), as ``save_clip_towers`` writes;
    (b) a transformers ``CLIPModel`` folder (config.json + model.safetensors, sharded
        safetensors, or a pytorch_model.bin read through the weights-only unpickler) with the
        tokenizer transformers saved there (see ``clip_load.load_transformers_folder``);
    (c) an open_clip checkpoint (.safetensors, or .pt/.pth/.bin/.ckpt through the weights-only
        unpickler and its allowlist; trust_pickle unpickles fully), its architecture from the
        ``open_clip_config.json`` beside it (the hub layout; a folder holding both works too) or
        from ``arch``, an open_clip model name (e.g. "ViT-B-32") whose config is read from the
        installed open_clip package without importing it.
    A model folder without an image tower: ModelFolderError saying which features need one.
    """
    root = Path(source)
    if not root.exists():
        raise ModelFolderError(f"CLIP not found: {root}")
    if root.is_dir() and (root / IMAGE_ENCODER).is_dir():
        from .clip_load import load_towers

        return load_towers(root, device=device, dtype=dtype)
    if root.is_dir() and arch is None and ((root / "text_encoder").is_dir()
                                           or (root / "model_index.json").is_file()):
        raise ModelFolderError(f"model folder {root} has no CLIP image tower ({IMAGE_ENCODER}/); "
                               + NEEDS_CLIP_HINT)
    if root.is_file() or (root / "open_clip_config.json").is_file() or arch is not None:
        from .clip_open_clip import load_open_clip

        model, tokenizer, processor = load_open_clip(
            root, arch=arch, dtype=dtype, trust_pickle=trust_pickle)
    elif (root / "config.json").is_file() and _is_clip_model_config(
            read_config_file(root / "config.json")):
        from .clip_load import load_transformers_folder

        model, tokenizer, processor = load_transformers_folder(
            root, dtype=dtype, trust_pickle=trust_pickle)
    else:
        model = None
    if model is not None:
        name = root.stem if root.is_file() else root.name
        return ClipModel.from_transformers(model.to(device), tokenizer, processor, name=name)
    raise ModelFolderError(f"{root} is not a CLIP: expected a model folder with {IMAGE_ENCODER}/, "
                           "a transformers CLIPModel folder (config.json) or an open_clip "
                           "checkpoint")
