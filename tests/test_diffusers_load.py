"""What we save loads and generates in diffusers with no extra arguments, and equals our image.

transformers 5 loads a model with no dtype argument in the dtype its config.json names (else the
weights' own), while diffusers' networks load in float32. Folders whose text-encoder config named
float16 (fp16 weights, as save_pretrained writes) gave an fp16 text encoder feeding an fp32 UNet in
`StableDiffusionPipeline.from_pretrained(folder)`: a dtype error on the first prompt.
"""

import json

import pytest
import torch
from diffusers import StableDiffusionPipeline
from transformers import CLIPTextModel

from ldm_engine.apps.cli import BUNDLED_MODEL
from ldm_engine.components import build_random, save_model, save_text_encoder
from ldm_engine.configs import TINY
from ldm_engine.convert import convert
from pipelines import TextToImage

PROMPT = "a yellow triangle in the centre, green background"
# The tolerance of the pixel-parity tests (tests/test_txt2img.py): same weights, same schedule,
# float32 rounding only.
PARITY = 1e-4


def _diffusers_image(folder, steps: int, seed: int, guidance: float) -> torch.Tensor:
    # No torch_dtype, no safety_checker argument: what the README tells a diffusers user to type.
    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    assert {pipe.unet.dtype, pipe.vae.dtype, pipe.text_encoder.dtype} == {torch.float32}
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    pipe.set_progress_bar_config(disable=True)
    out = pipe(PROMPT, num_inference_steps=steps, guidance_scale=guidance, output_type="np",
               generator=torch.Generator("cpu").manual_seed(seed)).images       # (1, H, W, 3)
    return torch.from_numpy(out).permute(0, 3, 1, 2)


def _assert_same_image(folder, steps: int = 4, seed: int = 3, guidance: float = 5.0) -> None:
    theirs = _diffusers_image(folder, steps, seed, guidance)
    ours = TextToImage.from_folder(folder, dtype="fp32")(
        PROMPT, num_inference_steps=steps, guidance_scale=guidance, sampler="ddim", seed=seed,
        progress=False).pixels
    assert ours.shape == theirs.shape
    assert ours.std() > 0.02                               # a real image, not a flat one
    assert (ours - theirs).abs().max() <= PARITY


@pytest.mark.skipif(not (BUNDLED_MODEL / "model_index.json").is_file(),
                    reason=f"no bundled model at {BUNDLED_MODEL}")
def test_bundled_folder_loads_and_generates_in_diffusers():
    _assert_same_image(BUNDLED_MODEL)
    assert json.loads((BUNDLED_MODEL / "text_encoder/config.json").read_text())["dtype"] == \
        "float32"


@pytest.mark.parametrize("how", ["save_model", "convert"])
def test_fp16_folders_we_write_load_in_diffusers(how, tiny_components, tiny_dir, tmp_path):
    folder = tmp_path / "half"
    if how == "save_model":
        save_model(tiny_components, folder, dtype=torch.float16)
    else:
        convert(tiny_dir, folder, dtype="fp16")
    weights = CLIPTextModel.from_pretrained(folder / "text_encoder", dtype=torch.float16).dtype
    assert weights == torch.float16                        # the fp16 weights are really fp16
    _assert_same_image(folder, guidance=7.5)
    assert json.loads((folder / "text_encoder/config.json").read_text())["dtype"] == "float32"


def test_a_half_precision_text_encoder_saves_a_float32_config(tmp_path):
    """train's CLIP stage saves with save_text_encoder; a model loaded (or trained) in fp16 must
    still write a config that loads in float32 by default."""
    text = build_random(TINY, seed=0).text_encoder.half()
    save_text_encoder(text, tmp_path / "text_encoder")
    loaded = CLIPTextModel.from_pretrained(tmp_path / "text_encoder", local_files_only=True)
    assert loaded.dtype == torch.float32
    key = "embeddings.token_embedding.weight"
    assert torch.equal(loaded.state_dict()[key], text.state_dict()[key].float())
