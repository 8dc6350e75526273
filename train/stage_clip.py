"""Stage 1: a small CLIP trained contrastively (Radford et al. 2021); both towers are kept.

The symmetric InfoNCE loss over a batch of (image, caption) pairs pulls each caption's pooled text
embedding towards its own image and away from the others'. With `clip.hard_negatives` each image
also has to beat a copy of its caption with one binding broken (NegCLIP, train/negatives.py).
What the UNet later reads is the text tower's per-token last hidden states (B, 77, D), exactly as
SD reads OpenAI CLIP's; the image tower and both projections are saved beside it
(ldm_engine.clip's layout) for reranking, zero-shot classification and CLIP scores.
"""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import Accelerator
from transformers import (CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel,
                          CLIPVisionConfig)

from ldm_engine.clip import save_clip_towers
from ldm_engine.components import save_text_encoder
from ldm_engine.fsutil import atomic_dir
from ldm_engine.tokenizer import SDTokenizer

from .config import TrainConfig
from .data import ImageCaptionSet
from .negatives import negatives_for
from .runtime import Fit, autocast, cosine_with_warmup


def text_config(config: TrainConfig) -> CLIPTextConfig:
    c = config.clip
    return CLIPTextConfig(vocab_size=49408, hidden_size=c.hidden_size,
                          intermediate_size=4 * c.hidden_size, num_hidden_layers=c.layers,
                          num_attention_heads=c.heads, max_position_embeddings=77,
                          hidden_act="quick_gelu", projection_dim=c.projection_dim,
                          bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)


def vision_config(config: TrainConfig) -> CLIPVisionConfig:
    c = config.clip
    return CLIPVisionConfig(hidden_size=c.vision_hidden_size,
                            intermediate_size=4 * c.vision_hidden_size,
                            num_hidden_layers=c.vision_layers, num_attention_heads=4,
                            image_size=config.data.size, patch_size=c.patch_size,
                            projection_dim=c.projection_dim)


def tokenize_all(tokenizer: SDTokenizer, captions: list[str]) -> torch.Tensor:
    """(N, 77) ids; each distinct caption is tokenized once."""
    unique = list(dict.fromkeys(captions))
    ids = tokenizer(unique)
    where = {t: k for k, t in enumerate(unique)}
    return ids[torch.tensor([where[t] for t in captions])]


class ContrastiveLoss(torch.nn.Module):
    """CLIP's symmetric InfoNCE (Radford et al. 2021, Fig. 3), optionally with NegCLIP's hard
    negatives: image i is scored against the B captions and the B negatives (B x 2B logits,
    target i); each caption only against the B images (B x B), as NegCLIP does. A module, so the
    whole loss runs inside accelerate's (DDP) wrapper."""

    def __init__(self, clip: CLIPModel):
        super().__init__()
        self.clip = clip

    def embed_text(self, ids: torch.Tensor) -> torch.Tensor:
        pooled = self.clip.text_model(input_ids=ids).pooler_output       # (N, D) at EOS
        return torch.nn.functional.normalize(self.clip.text_projection(pooled), dim=-1)

    def forward(self, ids: torch.Tensor, pixels: torch.Tensor,
                negatives: torch.Tensor | None = None,
                valid: torch.Tensor | None = None) -> torch.Tensor:
        image = self.clip.vision_model(pixel_values=pixels).pooler_output
        image = torch.nn.functional.normalize(self.clip.visual_projection(image), dim=-1)
        n = ids.shape[0]
        text = self.embed_text(ids if negatives is None else torch.cat([ids, negatives]))
        scale = self.clip.logit_scale.exp()
        per_image = scale * image @ text.T                                # (B, B) or (B, 2B)
        if negatives is not None:
            # A negative that does not exist (no binding to break) must not count.
            mask = torch.cat([torch.ones_like(valid), valid]).bool()
            per_image = per_image.masked_fill(~mask[None, :], float("-inf"))
        target = torch.arange(n, device=ids.device)
        per_text = per_image[:, :n].T
        return (torch.nn.functional.cross_entropy(per_image.float(), target) +
                torch.nn.functional.cross_entropy(per_text.float(), target)) / 2


class ImageSideLoss(ContrastiveLoss):
    """The same loss with the text tower frozen: texts are rows of a table of its pooled states,
    computed once, and only the image tower, both projections and the temperature learn. The
    text tower's per-token states, which the UNet reads, stay exactly as they were."""

    def __init__(self, clip: CLIPModel, pooled: torch.Tensor):
        super().__init__(clip)
        clip.text_model.requires_grad_(False)
        self.register_buffer("pooled", pooled, persistent=False)          # (R, D)

    def embed_text(self, rows: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(self.clip.text_projection(self.pooled[rows]),
                                             dim=-1)


@torch.no_grad()
def pooled_states(clip: CLIPModel, tokenizer: SDTokenizer, texts: list[str],
                  chunk: int = 1024) -> torch.Tensor:
    """(len(texts), D) pooled (EOS) text states of the frozen text tower."""
    out = []
    for k in range(0, len(texts), chunk):
        ids = tokenizer(texts[k:k + chunk])
        ids = ids[:, :int((ids == tokenizer.eos_id).int().argmax(-1).max()) + 1]
        out.append(clip.text_model(input_ids=ids).pooler_output.float())
    return torch.cat(out)


def fit_contrastive(stage: str, config: TrainConfig, accelerator: Accelerator,
                    loss_module: ContrastiveLoss, steps: int, texts: torch.Tensor,
                    negatives: torch.Tensor | None, valid: torch.Tensor | None,
                    data: ImageCaptionSet) -> torch.nn.Module:
    """One contrastive phase: AdamW over the trainable parameters, cosine schedule, and per
    step one hard negative per image drawn from its caption's (texts: what loss_module embeds
    for example i, ids or rows; negatives (N, k, ...) and valid (N, k), or None). Returns the
    prepared loss module."""
    c = config.clip
    k = 0 if negatives is None else negatives.shape[1]
    params = [p for p in loss_module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=c.lr, weight_decay=0.1)
    scheduler = cosine_with_warmup(optimizer, c.warmup_steps, steps)
    loss_module, optimizer = accelerator.prepare(loss_module, optimizer)

    def draw(n: int, g: torch.Generator) -> dict[str, torch.Tensor]:
        return {"which": torch.randint(0, max(k, 1), (n,), generator=g)}

    def loss(idx, draws):
        dev = accelerator.device
        neg = ok = None
        if k:
            neg = negatives[idx, draws["which"]].to(dev)
            ok = valid[idx, draws["which"]].to(dev)
        with autocast(accelerator, c.mixed_precision):
            return loss_module(texts[idx].to(dev), data.pixels(idx).to(dev), neg, ok)

    Fit(stage, config, accelerator, loss_module, optimizer, scheduler, steps, c.batch_size,
        len(data), draw=draw, loss=loss).run()
    return loss_module


def fit_image_side(config: TrainConfig, accelerator: Accelerator, clip: CLIPModel,
                   tokenizer: SDTokenizer, data: ImageCaptionSet) -> None:
    """Phase 2 of the clip stage (`clip.image_steps`): the image tower alone, against the frozen
    text tower, with NegCLIP hard negatives (`clip.image_hard_negatives`). The conditioning the
    UNet is trained on is fixed by then, so this sharpens reranking and zero-shot classification
    (which read the image tower) without changing any image the model generates."""
    c = config.clip
    k = c.image_hard_negatives
    captions = list(dict.fromkeys(data.captions))
    negs = {t: negatives_for(t, k, config.seed) for t in captions} if k else {}
    texts = list(dict.fromkeys(captions + [n for t in captions for n in negs.get(t, ()) if n]))
    row = {t: r for r, t in enumerate(texts)}
    pooled = pooled_states(clip.eval(), tokenizer, texts)
    cap_rows = torch.tensor([row[t] for t in data.captions])                # (N,)
    if k:
        neg_rows = torch.tensor([[row[n] if n else row[t] for n in negs[t]]
                                 for t in data.captions])                   # (N, k)
        neg_valid = torch.tensor([[n is not None for n in negs[t]] for t in data.captions])
    fit_contrastive("clip-image", config, accelerator, ImageSideLoss(clip.train(), pooled),
                    c.image_steps, cap_rows, neg_rows if k else None,
                    neg_valid if k else None, data)
    clip.text_model.requires_grad_(True)


def train_clip(config: TrainConfig, accelerator: Accelerator, data: ImageCaptionSet) -> Path:
    """Train the CLIP; write <output_dir>/clip/{text_encoder,tokenizer} and its towers
    (image_encoder, feature_extractor, text_projection: ldm_engine.clip's layout)."""
    c = config.clip
    out = Path(config.output_dir) / "clip"
    torch.manual_seed(config.seed)
    model = CLIPModel(CLIPConfig(text_config=text_config(config).to_dict(),
                                 vision_config=vision_config(config).to_dict(),
                                 projection_dim=c.projection_dim))
    tokenizer = SDTokenizer.from_bpe()
    full = tokenize_all(tokenizer, data.captions)
    # The text tower is causal and the loss reads the pooled state at EOS, so nothing after the
    # last EOS can change the loss: train on ids cut just past the longest caption (3-4x cheaper
    # than 77 positions; identical loss). The UNet later reads all 77 states, as SD does.
    length = int((full == tokenizer.eos_id).int().argmax(-1).max()) + 1
    k = c.hard_negatives
    if k:
        # k negatives per caption, made once; each step picks one per image with its generator.
        neg_text = {t: negatives_for(t, k, config.seed) for t in dict.fromkeys(data.captions)}
        flat = [n or t for t in data.captions for n in neg_text[t]]         # (N * k,)
        neg_ids = tokenize_all(tokenizer, flat).view(len(data), k, -1)
        neg_valid = torch.tensor([[n is not None for n in neg_text[t]] for t in data.captions])
        length = max(length, int((neg_ids == tokenizer.eos_id).int().argmax(-1).max()) + 1)
        neg_ids = neg_ids[..., :length].contiguous()
    ids = full[:, :length].contiguous()
    loss_module = fit_contrastive("clip", config, accelerator, ContrastiveLoss(model), c.steps,
                                  ids, neg_ids if k else None, neg_valid if k else None, data)
    if c.image_steps:
        fit_image_side(config, accelerator, accelerator.unwrap_model(loss_module).clip,
                       tokenizer, data)

    if accelerator.is_main_process:
        clip = accelerator.unwrap_model(loss_module).clip.eval()
        acc = retrieval_accuracy(clip, ids, data, n=min(512, len(data)))
        text = CLIPTextModel(text_config(config))
        # transformers 5: CLIPModel.text_model and CLIPTextModel share one key layout.
        text.load_state_dict(clip.text_model.state_dict())
        with atomic_dir(out, overwrite=True) as tmp:
            save_text_encoder(text, tmp / "text_encoder")
            tokenizer.save(tmp / "tokenizer")
            # The bundled towers read pixels in [-1, 1] (data.pixels): x / 255 normalised with
            # mean = std = 0.5 is exactly that.
            save_clip_towers(clip, tmp, image_size=config.data.size, image_mean=(0.5,) * 3,
                             image_std=(0.5,) * 3)
        accelerator.log({"clip/retrieval_top1": acc})
        accelerator.print(f"[clip] image->text top-1 retrieval in batches of 512: {acc:.1%}")
    accelerator.wait_for_everyone()
    return out


@torch.no_grad()
def retrieval_accuracy(clip: CLIPModel, ids: torch.Tensor, data: ImageCaptionSet, n: int) -> float:
    """Fraction of the last n images whose own caption scores highest among those n captions
    (captions that are identical strings count as correct)."""
    idx = torch.arange(len(data) - n, len(data))
    out = clip(input_ids=ids[idx], pixel_values=data.pixels(idx))
    best = out.logits_per_image.argmax(-1)
    same = (ids[idx][best] == ids[idx]).all(-1)
    return same.float().mean().item()
