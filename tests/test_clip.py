"""ldm_engine.clip against its references: transformers' CLIPModel and open_clip's own API.

Tiny random CLIPs throughout (tests/conftest.py: text tower = the tiny SD model's text encoder,
ViT 64 px). Tolerances: 1e-5 where the same float32 arithmetic runs in another order (the text
tower here sees ids cut past the longest prompt, transformers all 77); exact where the very
weights are reloaded; one 8-bit level where PIL and torch resize the same picture.
"""

from __future__ import annotations

import enum
import importlib
import importlib.util
import json
import os
import sys
import types

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

from ldm_engine.clip import ClipModel, has_clip, load_clip, make_image_processor
from ldm_engine.clip_open_clip import clip_config_from_open_clip
from ldm_engine.convert.errors import UnsafeCheckpointError
from ldm_engine.errors import ModelFolderError, UserInputError
from ldm_engine.tokenizer import SDTokenizer

LABELS = ["a red circle", "a blue square", "a green triangle on the left", "two yellow stars"]
TEMPLATES = ["a picture of {}", "{}, rendered", "a photo of {}, small"]


def processor():
    return make_image_processor(image_size=64, image_mean=(0.5,) * 3, image_std=(0.5,) * 3)


@pytest.fixture(scope="module")
def in_memory(tiny_clip):
    return ClipModel.from_transformers(tiny_clip, SDTokenizer.from_bpe(), processor(), name="mem")


def pictures(n: int, size=(64, 64), seed: int = 0) -> list[Image.Image]:
    """Smooth random RGB pictures (blocks upsampled), the kind of content CLIP sees."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size[0] // 8 + 1, size[1] // 8 + 1, generator=g)
    x = torch.nn.functional.interpolate(x, size=size, mode="bilinear")
    u8 = (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in u8]


def reference(tiny_clip, images, texts):
    """transformers' CLIPModel forward on the same ids and pixels: (logits_per_image, out)."""
    ids = SDTokenizer.from_bpe()(texts)
    pixels = processor()(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = tiny_clip(input_ids=ids, pixel_values=pixels)
    return out.logits_per_image, out


# --- the definitions, against transformers' CLIPModel -------------------------------------------

def test_classification_is_the_softmax_of_clipmodels_logits(tiny_clip, in_memory):
    images = pictures(3)
    probs = in_memory.classify(images, LABELS)
    logits, _ = reference(tiny_clip, images, LABELS)
    assert probs.shape == (3, len(LABELS)) and probs.dtype == torch.float32
    torch.testing.assert_close(probs.sum(-1), torch.ones(3), rtol=0, atol=1e-6)
    torch.testing.assert_close(probs, logits.softmax(-1), rtol=0, atol=1e-5)
    # The logits themselves (log-probabilities up to each row's constant): not near-uniform mush.
    assert float(logits.std()) > 0.1
    assert in_memory.logit_scale == pytest.approx(float(tiny_clip.logit_scale.exp()), rel=1e-6)


def test_template_averaging_is_the_renormalised_mean_of_unit_embeddings(tiny_clip, in_memory):
    images = pictures(2, seed=1)
    prompts = [t.replace("{}", label) for label in LABELS for t in TEMPLATES]
    _, out = reference(tiny_clip, images, prompts)
    per_prompt = out.text_embeds.view(len(LABELS), len(TEMPLATES), -1)     # unit vectors
    weights = per_prompt.mean(1)
    weights = weights / weights.norm(dim=-1, keepdim=True)
    expected = (tiny_clip.logit_scale.exp() * out.image_embeds @ weights.T).softmax(-1)
    got = in_memory.classify(images, LABELS, TEMPLATES)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    # ...and differs from the single-template answer, so the templates were really used.
    assert (got - in_memory.classify(images, LABELS)).abs().max() > 1e-3


def test_similarity_is_the_cosine_of_clipmodels_normalised_embeddings(tiny_clip, in_memory):
    images = pictures(3, seed=2)
    _, out = reference(tiny_clip, images, LABELS)
    sim = in_memory.similarity(images, LABELS)
    torch.testing.assert_close(sim, out.image_embeds @ out.text_embeds.T, rtol=0, atol=1e-5)
    torch.testing.assert_close(in_memory.text_embeds(LABELS), out.text_embeds, rtol=0, atol=1e-5)
    torch.testing.assert_close(in_memory.image_embeds(images), out.image_embeds, rtol=0, atol=1e-5)


def test_clip_score_is_100_times_the_clamped_paired_cosine(tiny_clip, in_memory):
    import copy

    images = pictures(4, seed=3)
    texts = LABELS
    cos = in_memory.similarity(images, texts).diag()
    # The same CLIP with W_i negated: every image embedding flips, so every cosine changes sign
    # and each pair lands on the other branch of max(cos, 0).
    flipped = copy.deepcopy(tiny_clip)
    with torch.no_grad():
        flipped.visual_projection.weight.neg_()
    mirror = ClipModel.from_transformers(flipped, SDTokenizer.from_bpe(), processor())
    assert (cos > 0).any() or (-cos > 0).any()
    for model, sign in ((in_memory, 1), (mirror, -1)):
        expected = 100 * (sign * cos).clamp(min=0)
        torch.testing.assert_close(model.score(images, texts), expected, rtol=0, atol=1e-4)
    assert (in_memory.score(images, texts) + mirror.score(images, texts)).min() > 0
    # One string scores every image against that prompt.
    sim = in_memory.similarity(images, texts)
    torch.testing.assert_close(mirror.score(images, texts[0]), 100 * (-sim[:, 0]).clamp(min=0),
                               rtol=0, atol=1e-4)


def test_tensor_pixels_are_the_8_bit_images_they_stand_for(in_memory):
    """A [0, 1] pixel tensor goes through the image processor as the 8-bit images it rounds to:
    exactly the PIL path, resized or not."""
    for size in [(64, 64), (80, 100), (130, 64)]:
        images = pictures(2, size=size, seed=4)
        x = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in images])
        torch.testing.assert_close(in_memory.pixel_values(x.float() / 255),
                                   in_memory.pixel_values(images), rtol=0, atol=0)


def test_concurrent_calls_give_the_sequential_answers(in_memory):
    from concurrent.futures import ThreadPoolExecutor

    images = pictures(2, seed=8)
    jobs = [lambda: in_memory.classify(images, LABELS, TEMPLATES),
            lambda: in_memory.similarity(images, LABELS[:2]),
            lambda: in_memory.text_embeds(LABELS[::-1])] * 3
    expected = [job() for job in jobs]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda job: job(), jobs))
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


# --- loading: our folder layout, a transformers folder ------------------------------------------

def test_saved_towers_load_back_identical(tiny_clip_dir, tiny_dir, in_memory, tiny_clip_model):
    images = pictures(2, seed=6)
    assert tiny_clip_model.name == "tiny-clip"
    assert torch.equal(tiny_clip_model.text_embeds(LABELS), in_memory.text_embeds(LABELS))
    assert torch.equal(tiny_clip_model.image_embeds(images), in_memory.image_embeds(images))
    assert tiny_clip_model.logit_scale == in_memory.logit_scale
    assert has_clip(tiny_clip_dir) and not has_clip(tiny_dir)
    index = json.loads((tiny_clip_dir / "model_index.json").read_text())
    assert index["image_encoder"] == ["transformers", "CLIPVisionModelWithProjection"]
    assert index["feature_extractor"] == ["transformers", "CLIPImageProcessor"]
    config = json.loads((tiny_clip_dir / "text_projection/config.json").read_text())
    assert config == {"in_features": 32, "out_features": 32}


def test_the_unets_text_encoder_is_the_clips_text_tower(tiny_clip_dir, tiny_clip):
    from ldm_engine.components import load_model

    components = load_model(tiny_clip_dir)
    ids = components.tokenizer(LABELS)
    with torch.no_grad():
        assert torch.equal(components.text_encoder(ids).last_hidden_state,
                           tiny_clip.text_model(input_ids=ids).last_hidden_state)


def test_diffusers_loads_the_folder_with_its_image_encoder(tiny_clip_dir):
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPVisionModelWithProjection

    pipe = StableDiffusionPipeline.from_pretrained(tiny_clip_dir, safety_checker=None,
                                                   requires_safety_checker=False,
                                                   local_files_only=True)
    assert isinstance(pipe.image_encoder, CLIPVisionModelWithProjection)
    assert pipe.feature_extractor.crop_size["height"] == 64


@pytest.mark.parametrize("weights, with_tokenizer",
                         [("safetensors", True), ("sharded", False), ("bin", False)])
def test_a_transformers_clipmodel_folder_equals_the_model_in_memory(
        tmp_path, tiny_clip, in_memory, weights, with_tokenizer):
    folder = tmp_path / "clip-folder"
    tiny_clip.save_pretrained(folder, **({"max_shard_size": "1MB"} if weights == "sharded" else {}))
    if weights == "sharded":
        assert len(list(folder.glob("model-*.safetensors"))) > 1
    if weights == "bin":
        (folder / "model.safetensors").unlink()
        torch.save(tiny_clip.state_dict(), folder / "pytorch_model.bin")
    if with_tokenizer:
        SDTokenizer.from_bpe().hf.save_pretrained(folder)
    processor().save_pretrained(folder)
    loaded = load_clip(folder)
    from transformers import CLIPTokenizer
    assert isinstance(loaded.tokenizer, CLIPTokenizer if with_tokenizer else SDTokenizer)
    images = pictures(2, seed=7)
    torch.testing.assert_close(loaded.text_embeds(LABELS), in_memory.text_embeds(LABELS),
                               rtol=0, atol=1e-6)
    assert torch.equal(loaded.image_embeds(images), in_memory.image_embeds(images))
    assert loaded.logit_scale == pytest.approx(in_memory.logit_scale, rel=1e-7)
    assert has_clip(folder)


def test_bfloat16_towers_give_float32_embeddings_close_to_float32(tiny_clip_dir, tiny_clip_model):
    half = load_clip(tiny_clip_dir, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16
    got = half.text_embeds(LABELS)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, tiny_clip_model.text_embeds(LABELS), rtol=0, atol=3e-2)


def test_a_model_folder_without_an_image_tower_says_what_needs_one(tiny_dir):
    with pytest.raises(ModelFolderError) as err:
        load_clip(tiny_dir)
    message = str(err.value)
    assert "\n" not in message and "image_encoder" in message and "--clip PATH" in message
    assert "classification" in message and "rerank" in message


def test_missing_pieces_are_named(tmp_path, tiny_clip_dir):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_clip_dir, broken)
    (broken / "text_projection/model.safetensors").unlink()
    with pytest.raises(ModelFolderError, match="text_projection/model.safetensors"):
        load_clip(broken)
    with pytest.raises(ModelFolderError, match="not found"):
        load_clip(tmp_path / "nowhere")
    assert not has_clip(broken) and not has_clip(tmp_path / "nowhere")


# --- bad input: one line, before any compute ----------------------------------------------------

class Trapped(AssertionError):
    pass


@pytest.fixture
def trapped(tiny_clip_model, monkeypatch):
    def trap(*args, **kwargs):
        raise Trapped("a tower ran before the bad input was reported")

    for tower in (tiny_clip_model._text, tiny_clip_model._vision):
        monkeypatch.setattr(tower, "forward", trap)
    return tiny_clip_model


BAD_CALLS = {
    "no labels": lambda m: m.classify(pictures(1), []),
    "one string of labels": lambda m: m.classify(pictures(1), "red,blue"),
    "empty label": lambda m: m.classify(pictures(1), ["red", "  "]),
    "repeated label": lambda m: m.classify(pictures(1), ["red", "blue", "red"]),
    "non-string label": lambda m: m.classify(pictures(1), ["red", 3]),
    "no templates": lambda m: m.classify(pictures(1), ["red"], templates=[]),
    "template without {}": lambda m: m.classify(pictures(1), ["red"], templates=["a {}", "a"]),
    "no images": lambda m: m.classify([], ["red"]),
    "not an image": lambda m: m.classify([pictures(1)[0], "cat.png"], ["red"]),
    "a path, not images": lambda m: m.image_embeds("cat.png"),
    "numpy array": lambda m: m.image_embeds(np.zeros((64, 64, 3))),
    "uint8 tensor": lambda m: m.image_embeds(torch.zeros(1, 3, 64, 64, dtype=torch.uint8)),
    "[-1, 1] tensor": lambda m: m.image_embeds(torch.full((1, 3, 64, 64), -0.5)),
    "NaN tensor": lambda m: m.image_embeds(torch.full((1, 3, 64, 64), float("nan"))),
    "one channel": lambda m: m.image_embeds(torch.zeros(1, 1, 64, 64)),
    "no texts": lambda m: m.text_embeds([]),
    "non-string text": lambda m: m.text_embeds([None]),
    "unpaired score": lambda m: m.score(pictures(2), ["a", "b", "c"]),
    "similarity without texts": lambda m: m.similarity(pictures(1), []),
}


@pytest.mark.parametrize("case", sorted(BAD_CALLS))
def test_bad_input_is_one_line_before_any_compute(trapped, case):
    with pytest.raises(UserInputError) as err:
        BAD_CALLS[case](trapped)
    assert "\n" not in str(err.value) and str(err.value)


def test_the_trap_springs_on_good_input(trapped):
    # Otherwise the test above could pass with the towers never reachable.
    with pytest.raises(Trapped):
        trapped.classify(pictures(1), ["red"])


# --- pickles ------------------------------------------------------------------------------------

class Reduce:
    """An object whose unpickling calls func(*args)."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


TINY_OPEN_CLIP = {"embed_dim": 32,
                  "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
                  "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32,
                               "heads": 4, "layers": 2}}


def test_a_pickle_with_code_is_refused_and_never_run(tmp_path, tiny_clip):
    canary = tmp_path / "canary"
    bad = tmp_path / "open_clip_model.pt"
    torch.save({"state_dict": {"logit_scale": torch.ones(()),
                               "x": Reduce(os.system, f"touch {canary}")}}, bad)
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_OPEN_CLIP}))
    with pytest.raises(UnsafeCheckpointError, match="system") as err:
        load_clip(bad)
    assert "\n" not in str(err.value)
    folder = tmp_path / "hf"
    tiny_clip.save_pretrained(folder)
    (folder / "model.safetensors").unlink()
    state = dict(tiny_clip.state_dict())
    state["x"] = Reduce(os.system, f"touch {canary}")
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(UnsafeCheckpointError, match="system"):
        load_clip(folder)
    assert not canary.exists()


# --- open_clip: converted here, compared with open_clip's own API -------------------------------

def import_open_clip():
    """open_clip (test-only reference), imported with a stand-in torchvision where none is
    installed: its package init imports torchvision's transforms and ops at module level, which
    only its training and preprocessing code use. This venv's torch is a CPU build and the only
    torchvision on offer is a CUDA build, whose import fails (torchvision::nms). The stand-in
    is in sys.modules only while open_clip imports."""
    if "open_clip" in sys.modules:
        return sys.modules["open_clip"]
    if importlib.util.find_spec("open_clip") is None:
        pytest.skip("open_clip_torch is not installed (pip install --no-deps open_clip_torch)")
    from transformers.utils import is_torchvision_available

    # transformers caches whether torchvision exists; ask now, so it never sees the stand-in.
    assert not is_torchvision_available() or importlib.util.find_spec("torchvision")

    stand_ins = {}
    if importlib.util.find_spec("torchvision") is None:
        class Inert:
            def __init__(self, *args, **kwargs):
                pass

        def anything(name):
            if name.startswith("_"):
                raise AttributeError(name)
            return Inert

        names = ["torchvision", "torchvision.transforms", "torchvision.transforms.functional",
                 "torchvision.ops", "torchvision.ops.misc"]
        stand_ins = {n: types.ModuleType(n) for n in names}
        for name, module in stand_ins.items():
            module.__getattr__ = anything
            if "." in name:
                parent, child = name.rsplit(".", 1)
                setattr(stand_ins[parent], child, module)
        stand_ins["torchvision.transforms"].InterpolationMode = enum.Enum(
            "InterpolationMode", "NEAREST BILINEAR BICUBIC BOX HAMMING LANCZOS")
    sys.modules.update(stand_ins)
    try:
        return importlib.import_module("open_clip")
    finally:
        for name in stand_ins:
            sys.modules.pop(name, None)


def random_open_clip(open_clip, cfg: dict, seed: int):
    torch.manual_seed(seed)
    model = open_clip.model.CLIP(**cfg).eval()
    with torch.no_grad():                      # LayerNorms and biases off their 1/0 init too
        for name, p in model.named_parameters():
            if "ln" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
        model.logit_scale.fill_(2.0)
    return model


OPEN_CLIP_CASES = {
    "gelu, safetensors, hub config": (dict(TINY_OPEN_CLIP), "open_clip_model.safetensors"),
    "quick_gelu, 32 positions, .pt": (
        {**TINY_OPEN_CLIP, "quick_gelu": True,
         "text_cfg": {**TINY_OPEN_CLIP["text_cfg"], "context_length": 32, "mlp_ratio": 2.0}},
        "epoch_3.pt"),
}


@pytest.mark.parametrize("case", sorted(OPEN_CLIP_CASES))
def test_open_clip_scores_match_open_clips_own_api(tmp_path, case):
    open_clip = import_open_clip()
    cfg, filename = OPEN_CLIP_CASES[case]
    model = random_open_clip(open_clip, cfg, seed=len(case))
    file = tmp_path / filename
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if file.suffix == ".safetensors":
        safetensors.torch.save_file(state, str(file))
    else:   # a training checkpoint: wrapped, saved from DistributedDataParallel
        torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, file)
    preprocess = {"mean": [0.4, 0.5, 0.6], "std": [0.2, 0.3, 0.25]}
    (tmp_path / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": cfg, "preprocess_cfg": preprocess}))
    ours = load_clip(file)
    # The hub layout as a folder: the one weights file beside open_clip_config.json.
    assert torch.equal(load_clip(tmp_path).text_embeds(["a dog"]), ours.text_embeds(["a dog"]))

    # Pixels on the 8-bit grid: a tensor is scored as the 8-bit image it stands for.
    images = torch.randint(0, 256, (3, 3, 32, 32),
                           generator=torch.Generator().manual_seed(0)).float() / 255
    texts = ["a red circle", "two blue squares, left of a green one", "", "Tom &amp; Jerry"]
    tokenizer = open_clip.tokenize if cfg["text_cfg"]["context_length"] == 77 else (
        lambda t: open_clip.tokenize(t, context_length=cfg["text_cfg"]["context_length"]))
    assert torch.equal(ours.tokenize(texts), tokenizer(texts))
    pixels = ours.pixel_values(images)
    expected_pixels = (images - torch.tensor(preprocess["mean"]).view(1, 3, 1, 1)) \
        / torch.tensor(preprocess["std"]).view(1, 3, 1, 1)
    torch.testing.assert_close(pixels, expected_pixels, rtol=0, atol=1e-6)
    with torch.no_grad():
        image_ref = model.encode_image(pixels, normalize=True)
        text_ref = model.encode_text(tokenizer(texts), normalize=True)
        logits_ref, _ = model.get_logits(pixels, tokenizer(texts))
    torch.testing.assert_close(ours.image_embeds(images), image_ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours.text_embeds(texts), text_ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours.logit_scale * ours.similarity(images, texts), logits_ref,
                               rtol=0, atol=1e-5)
    probs = ours.classify(images, texts[:2])
    torch.testing.assert_close(probs, logits_ref[:, :2].softmax(-1), rtol=0, atol=1e-5)


def test_open_clip_arch_is_read_from_the_installed_packages_configs(tmp_path, monkeypatch):
    open_clip = import_open_clip()
    model = random_open_clip(open_clip, TINY_OPEN_CLIP, seed=5)
    file = tmp_path / "weights" / "tiny.safetensors"
    file.parent.mkdir()
    safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                                str(file))
    # An installed open_clip whose model_configs/ holds the tiny architecture (the real one's
    # ViT-B-32 would cost a 150M-parameter model to compare).
    package = tmp_path / "site" / "open_clip"
    (package / "model_configs").mkdir(parents=True)
    (package / "model_configs" / "tiny-ViT.json").write_text(json.dumps(TINY_OPEN_CLIP))
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args):
        if name == "open_clip":
            return types.SimpleNamespace(submodule_search_locations=[str(package)])
        return real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    ours = load_clip(file, arch="tiny-ViT")
    texts = ["a red circle", "a blue square"]
    with torch.no_grad():
        ref = model.encode_text(open_clip.tokenize(texts), normalize=True)
    torch.testing.assert_close(ours.text_embeds(texts), ref, rtol=0, atol=1e-5)
    with pytest.raises(ModelFolderError, match="no model config 'tiny-ViT-L'"):
        load_clip(file, arch="tiny-ViT-L")
    with pytest.raises(ModelFolderError, match="not an open_clip model name"):
        load_clip(file, arch="../../etc/passwd")
    with pytest.raises(ModelFolderError, match="open_clip_config.json beside it"):
        load_clip(file)


UNSUPPORTED = {
    "ModifiedResNet": ({"vision_cfg": {"layers": [3, 4, 6, 3], "width": 64}}, "ModifiedResNet"),
    "timm tower": ({"vision_cfg": {"timm_model_name": "convnext_base"}}, "timm_model_name"),
    "hf text tower": ({"text_cfg": {"hf_model_name": "xlm-roberta-base"}}, "hf_model_name"),
    "attentional pool": ({"vision_cfg": {"attentional_pool": True}}, "attentional_pool"),
    "layer scale": ({"vision_cfg": {"ls_init_value": 1e-5}}, "ls_init_value"),
    "SigLIP": ({"init_logit_bias": -10}, "init_logit_bias"),
    "CoCa": ({"multimodal_cfg": {"width": 32}}, "multimodal_cfg"),
    "avg pooling": ({"vision_cfg": {"pool_type": "avg"}}, "pool_type"),
    "no causal mask": ({"text_cfg": {"no_causal_mask": True}}, "no_causal_mask"),
    "unknown setting": ({"text_cfg": {"rope": True}}, "text_cfg.rope"),
    "custom block": ({"vision_cfg": {"block_type": "custom"}}, "block_type"),
}


@pytest.mark.parametrize("case", sorted(UNSUPPORTED))
def test_open_clip_models_transformers_cannot_run_are_refused_in_one_line(case):
    change, named = UNSUPPORTED[case]
    cfg = {**TINY_OPEN_CLIP, **{k: v for k, v in change.items() if not k.endswith("_cfg")}}
    for tower in ("vision_cfg", "text_cfg"):
        cfg[tower] = {**TINY_OPEN_CLIP[tower], **change.get(tower, {})}
    if case == "CoCa":
        cfg["multimodal_cfg"] = change["multimodal_cfg"]
    with pytest.raises(ModelFolderError) as err:
        clip_config_from_open_clip(cfg)
    assert named in str(err.value) and "\n" not in str(err.value)
    clip_config_from_open_clip(TINY_OPEN_CLIP)     # the unchanged config converts
