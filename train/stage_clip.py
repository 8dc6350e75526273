"""Stage 1: a small CLIP trained contrastively (Radford et al. 2021); its text tower is kept.

The symmetric InfoNCE loss over a batch of (image, caption) pairs pulls each caption's pooled text
embedding towards its own image and away from the others'. What the UNet later reads is the text
tower's per-token last hidden states (B, 77, D), exactly as SD reads OpenAI CLIP's.
"""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import Accelerator
from transformers import (CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel,
                          CLIPVisionConfig)

from ldm_engine.components import save_text_encoder
from ldm_engine.fsutil import atomic_dir
from ldm_engine.tokenizer import SDTokenizer

from .config import TrainConfig
from .data import ImageCaptionSet
from .runtime import Fit, autocast, cosine_with_warmup


def text_config(config: TrainConfig) -> CLIPTextConfig:
    c = config.clip
    return CLIPTextConfig(vocab_size=49408, hidden_size=c.hidden_size,
                          intermediate_size=4 * c.hidden_size, num_hidden_layers=c.layers,
                          num_attention_heads=c.heads, max_position_embeddings=77,
                          hidden_act="quick_gelu", projection_dim=c.projection_dim,
                          bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)


def tokenize_all(tokenizer: SDTokenizer, captions: list[str]) -> torch.Tensor:
    """(N, 77) ids; each distinct caption is tokenized once."""
    unique = list(dict.fromkeys(captions))
    ids = tokenizer(unique)
    where = {t: k for k, t in enumerate(unique)}
    return ids[torch.tensor([where[t] for t in captions])]


def train_clip(config: TrainConfig, accelerator: Accelerator, data: ImageCaptionSet) -> Path:
    """Train the CLIP; write <output_dir>/clip/{text_encoder,tokenizer}."""
    c = config.clip
    out = Path(config.output_dir) / "clip"
    torch.manual_seed(config.seed)
    vision = CLIPVisionConfig(hidden_size=c.vision_hidden_size,
                              intermediate_size=4 * c.vision_hidden_size,
                              num_hidden_layers=c.vision_layers, num_attention_heads=4,
                              image_size=config.data.size, patch_size=c.patch_size,
                              projection_dim=c.projection_dim)
    model = CLIPModel(CLIPConfig(text_config=text_config(config).to_dict(),
                                 vision_config=vision.to_dict(), projection_dim=c.projection_dim))
    tokenizer = SDTokenizer.from_bpe()
    ids = tokenize_all(tokenizer, data.captions)
    # The text tower is causal and the loss reads the pooled state at EOS, so nothing after the
    # last EOS can change the loss: train on ids cut just past the longest caption (3-4x cheaper
    # than 77 positions; identical loss). The UNet later reads all 77 states, as SD does.
    length = int((ids == tokenizer.eos_id).int().argmax(-1).max()) + 1
    ids = ids[:, :length].contiguous()
    optimizer = torch.optim.AdamW(model.parameters(), lr=c.lr, weight_decay=0.1)
    scheduler = cosine_with_warmup(optimizer, c.warmup_steps, c.steps)
    model, optimizer = accelerator.prepare(model, optimizer)

    def loss(idx, _draws):
        with autocast(accelerator, c.mixed_precision):
            return model(input_ids=ids[idx].to(accelerator.device),
                         pixel_values=data.pixels(idx).to(accelerator.device),
                         return_loss=True).loss

    Fit("clip", config, accelerator, model, optimizer, scheduler, c.steps, c.batch_size,
        len(data), draw=lambda n, g: {}, loss=loss).run()

    if accelerator.is_main_process:
        clip = accelerator.unwrap_model(model).eval()
        acc = retrieval_accuracy(clip, ids, data, n=min(512, len(data)))
        text = CLIPTextModel(text_config(config))
        # transformers 5: CLIPModel.text_model and CLIPTextModel share one key layout.
        text.load_state_dict(clip.text_model.state_dict())
        with atomic_dir(out, overwrite=True) as tmp:
            save_text_encoder(text, tmp / "text_encoder")
            tokenizer.save(tmp / "tokenizer")
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
