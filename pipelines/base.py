"""What every pipeline shares: text encoding, seeding, guidance set-up, VAE decoding, results."""

from __future__ import annotations

import copy
import logging
import os
import random
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image

from ldm_engine.components import UNET_WEIGHTS, Components, load_model
from ldm_engine.convert.to_components import load_single_file
from ldm_engine.errors import ModelFolderError, NonFiniteError, UserInputError
from ldm_engine.limits import check_memory, check_size, device_memory
from ldm_engine.modelhash import model_hash
from ldm_engine.precision import DTYPES, resolve_device, resolve_dtype

from schedulers import get_sampler, make_denoiser, train_schedule

from .guidance import Guidance, UNetFn
from .loop import denoise
from .modes import Batch, Mode, check_count
from .observe import Observer, as_observers
from .params import GenerationParams, check_request, check_rerank, check_seed
from .pnginfo import RerankChoice, save_png
from .embeddings import Embedding, load_embedding
from .prompts import encode_prompts
from .speed import Accelerated, Attention, SpeedOptions

if TYPE_CHECKING:
    from ldm_engine.clip import ClipModel

    from .rerank import Candidate

log = logging.getLogger("ldm_engine.pipelines")

# torch dtype -> the name GenerationParams.dtype (and the PNG's `Dtype` field) records.
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}

# Held only while a pipeline builds its fp32 VAE copy (once per pipeline; see _fp32_vae).
_FP32_VAE_LOCK = threading.Lock()


def _decoder_copy_fp32(vae: torch.nn.Module) -> torch.nn.Module:
    """A copy of `vae` in fp32 without its encoder, which decoding never runs.

    deepcopy keeps everything decode() relies on (channels_last weights, tiling, attention
    processors). Its memo says what to use for objects it meets: the weights' fp32 versions, so
    no reduced-precision copy is made first, and None for the encoder (137 of the 335 MB of SD's
    VAE in fp32).
    """
    encoder = getattr(vae, "encoder", None)
    skip = {id(p) for p in encoder.parameters()} if encoder is not None else set()
    memo = {id(p): torch.nn.Parameter(p.detach().float(), requires_grad=False)
            for p in vae.parameters() if id(p) not in skip and p.is_floating_point()}
    if encoder is not None:
        memo[id(encoder)] = None
    # Anything the memo did not cover (buffers) goes to fp32 too; torch's own Module.float,
    # because diffusers' override warns on every dtype cast.
    return torch.nn.Module.float(copy.deepcopy(vae, memo))


@dataclass
class GenerationResult:
    images: list[Image.Image]
    pixels: torch.Tensor                 # (B, 3, H, W) float32 in [0, 1]
    latents: torch.Tensor                # (B, C, h, w) final latents, before VAE scaling is undone
    params: list[GenerationParams]       # one per image; seed is that image's own seed
    # With rerank > 1 (pipelines.rerank): per image, all its candidates, best first; the
    # fields above then hold each image's best candidate (params: the image's request, its
    # own seed and rerank, which re-plays to the same choice). None without reranking.
    candidates: list[list["Candidate"]] | None = None

    @property
    def scores(self) -> list[float] | None:
        """Each image's rerank score (CLIP cosine of image and prompt), None without rerank."""
        return None if self.candidates is None else [c[0].score for c in self.candidates]

    def save(self, path: str | os.PathLike) -> list[Path]:
        """Save PNGs with their parameters; several images become name-0.png, name-1.png, ...
        A reranked image also records its score and the chosen candidate's seed."""
        paths = output_paths(path, len(self.images))
        for k, (image, params, p) in enumerate(zip(self.images, self.params, paths)):
            choice = None
            if self.candidates is not None:
                best = self.candidates[k][0]
                choice = RerankChoice(score=best.score, seed=best.seed)
            save_png(image, p, params, choice)
        return paths


def output_paths(path: str | os.PathLike, n: int) -> list[Path]:
    """Where GenerationResult.save writes n images: path itself, or name-0.png, name-1.png, ..."""
    path = Path(path)
    if n == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{k}{path.suffix or '.png'}") for k in range(n)]


def make_generators(n: int, seed: int | None,
                    generator: torch.Generator | Sequence[torch.Generator] | None
                    ) -> tuple[list[torch.Generator], list[int]]:
    """One CPU generator per image, and the seed each one stands for.

    Image j of a seeded call uses seed + j, so image j of a batch equals a single generation with
    seed + j (the AUTOMATIC1111 convention). A single user generator serves all images in turn.
    """
    if generator is not None:
        gens = list(generator) if isinstance(generator, Sequence) else [generator] * n
        if not all(isinstance(g, torch.Generator) for g in gens):
            bad = next(g for g in gens if not isinstance(g, torch.Generator))
            raise UserInputError(f"generator must be a torch.Generator (or one per image), "
                                 f"got {type(bad).__name__}")
        if len(gens) != n:
            raise UserInputError(f"got {len(gens)} generators for {n} images; pass one per image")
        return gens, [g.initial_seed() for g in gens]
    if seed is None:
        seed = random.SystemRandom().randrange(2**32)
    check_seed(seed, n)
    seeds = [int(seed) + j for j in range(n)]
    return [torch.Generator("cpu").manual_seed(s) for s in seeds], seeds


def _differences(wanted: GenerationParams, made: GenerationParams) -> list[str]:
    """How an image made with `made` can differ from the one `wanted` describes."""
    out = []
    # An 8-digit hash is A1111's pre-2023 one (of 64 KiB of the file): not comparable.
    if len(wanted.model_hash) == len(made.model_hash) and wanted.model_hash != made.model_hash:
        out.append(f"model hash {made.model_hash}, the image's is {wanted.model_hash}")
    for field in ("dtype", "deep_cache", "vae_tiling"):
        if getattr(wanted, field) != getattr(made, field):
            out.append(f"{field} {getattr(made, field)}, the image's is {getattr(wanted, field)}")
    return out


def _placement(device: str | torch.device, dtype: str | torch.dtype, *, compile: bool,
               deep_cache: int, vae_tiling: bool, attention: Attention,
               channels_last: bool | None) -> tuple[SpeedOptions, torch.device, torch.dtype]:
    """The speed options, device and dtype of a load, checked before any weights are read."""
    speed = SpeedOptions(compile=compile, channels_last=channels_last, attention=attention,
                         deep_cache=deep_cache, vae_tiling=vae_tiling)
    where = resolve_device(device)
    precision = resolve_dtype(dtype, where)
    speed.check_device(where)
    return speed, where, precision


class Pipeline:
    def __init__(self, components: Components, *, name: str = "",
                 speed: SpeedOptions | None = None, unet_file: Path | None = None,
                 source: Path | None = None):
        # Not forced into eval mode here: training samples with its live networks and must get
        # them back unchanged (loaded models are already in eval mode). Without speed options the
        # networks are used exactly as given; with them, they may be re-laid out and compiled.
        self.components = components
        self.name = name
        # The folder or file the weights came from (None: built in memory, e.g. by training).
        self.source = source
        self.accelerated = (Accelerated(components.unet, components.vae, speed,
                                        unet_file=unet_file) if speed is not None else None)
        self._model_hash: str | None = None
        self._model_hash_lock = threading.Lock()
        # The CLIP that scores images (reranking): loaded from `source` on first use, shared by
        # the copies with_embeddings makes; with_clip gives a copy its own.
        self._clip = _ClipSlot()

    @classmethod
    def from_folder(cls, path: str | os.PathLike, *, device: str | torch.device = "cpu",
                    dtype: str | torch.dtype = torch.float32, compile: bool = False,
                    deep_cache: int = 1, vae_tiling: bool = False, attention: Attention = "sdpa",
                    channels_last: bool | None = None):
        """Load a local diffusers-layout folder (a .safetensors/.ckpt file: see from_single_file).

        device: "auto" | "cpu" | "cuda[:N]"; dtype: "auto" | "fp32" | "bf16" | "fp16" or a torch
        dtype ("auto": bf16 on CPUs with native bf16, fp16 on CUDA, else fp32). The speed options
        are those of SpeedOptions; deep_cache > 1 and vae_tiling are approximations.
        """
        path = Path(path)
        if path.is_file():
            return cls.from_single_file(path, device=device, dtype=dtype, compile=compile,
                                        deep_cache=deep_cache, vae_tiling=vae_tiling,
                                        attention=attention, channels_last=channels_last)
        speed, where, precision = _placement(device, dtype, compile=compile,
                                             deep_cache=deep_cache, vae_tiling=vae_tiling,
                                             attention=attention, channels_last=channels_last)
        components = load_model(path, device=where, dtype=precision,
                                channels_last=speed.uses_channels_last(precision))
        return cls(components, name=path.name, speed=speed, unet_file=path / UNET_WEIGHTS,
                   source=path)

    @classmethod
    def from_single_file(cls, path: str | os.PathLike, *, device: str | torch.device = "cpu",
                         dtype: str | torch.dtype = torch.float32, compile: bool = False,
                         deep_cache: int = 1, vae_tiling: bool = False,
                         attention: Attention = "sdpa", channels_last: bool | None = None,
                         family: str | None = None, prediction: str | None = None):
        """Load an SD-1.x/2.x single file (.safetensors, .ckpt), as diffusers' method of this name.

        The file is converted in memory exactly as `ldm convert` reads it (safe unpickling only,
        shapes checked) and nothing is written. family/prediction are `ldm convert`'s --family and
        --prediction, for files without our metadata. The other options are from_folder's; with
        compile=True the eager UNet weights stay in memory beside the compiled packages (a
        folder's are dropped and re-read from its UNet file, which a single file does not have):
        `ldm convert` the file to a folder to save that memory.
        """
        path = Path(path)
        if not path.is_file():
            raise ModelFolderError(f"single-file checkpoint not found: {path}")
        speed, where, precision = _placement(device, dtype, compile=compile,
                                             deep_cache=deep_cache, vae_tiling=vae_tiling,
                                             attention=attention, channels_last=channels_last)
        components = load_single_file(path, device=where, dtype=precision,
                                      channels_last=speed.uses_channels_last(precision),
                                      family=family, prediction=prediction)
        # source is the file itself (A1111's model hash is the checkpoint file's).
        return cls(components, name=path.stem, speed=speed, unet_file=None, source=path)

    @property
    def device(self) -> torch.device:
        return self.components.device

    @property
    def dtype(self) -> torch.dtype:
        return self.components.dtype

    @property
    def model_hash(self) -> str:
        """A1111's ``Model hash`` of `source` (ldm_engine.modelhash), "" without one.

        Hashing reads every weights file (about 3 s for an fp32 SD-1.5 folder), so it is done
        once, when the first image records it, not at load time.
        """
        if self.source is None:
            return ""
        with self._model_hash_lock:
            if self._model_hash is None:
                self._model_hash = model_hash(self.source)
            return self._model_hash

    def pixel_settings(self) -> dict:
        """The load-time choices that change pixels, as GenerationParams fields."""
        options = self.accelerated.options if self.accelerated is not None else SpeedOptions()
        return {"dtype": DTYPE_NAMES[self.dtype], "deep_cache": options.deep_cache,
                "vae_tiling": options.vae_tiling}

    def check_generation_size(self, *, height: int, width: int, num_images: int, guided: bool,
                              allow_large: bool = False) -> None:
        """The size limits and the memory estimate of ldm_engine.limits, before any compute."""
        shape = self.components.shape
        check_size(shape, height=height, width=width, num_images=num_images,
                   allow_large=allow_large)
        vae = self.components.vae
        # An fp16 VAE marked force_upcast decodes in fp32 (see decode).
        vae_bytes = (4 if vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
                     else vae.dtype.itemsize)
        tiled = self.accelerated is not None and self.accelerated.options.vae_tiling
        check_memory(shape, device_memory(self.device), height=height, width=width,
                     num_images=num_images, guided=guided, dtype_bytes=self.dtype.itemsize,
                     vae_dtype_bytes=vae_bytes,
                     vae_tile=(getattr(vae, "tile_latent_min_size", 0) * shape.vae_factor
                               or None) if tiled else None,
                     allow_large=allow_large)

    def encode_text(self, texts: Sequence[str], clip_skip: int = 1) -> torch.Tensor:
        """CLIP text states (B, 77 * k, D) of A1111-syntax prompts (pipelines.prompts): k
        75-token windows, weights applied, the clip_skip-th layer from the end; every text padded
        to the most windows of the call; each distinct text goes through the encoder once."""
        c = self.components
        return encode_prompts(c.tokenizer, c.text_encoder, texts, clip_skip=clip_skip,
                              device=self.device, embeddings=getattr(self, "embeddings", ()))

    def with_embeddings(self, *files: str | os.PathLike | Embedding,
                        names: Sequence[str] | None = None):
        """This pipeline (same networks, not copied) also reading textual-inversion embeddings:
        a word named after each file (or `names`) stands for its vectors (pipelines.embeddings).

        A new pipeline object: this one, and any generation running on it, is unchanged.
        """
        if names is not None and len(names) != len(files):
            raise UserInputError(f"{len(names)} names for {len(files)} embeddings")
        dim = self.components.text_encoder.config.hidden_size
        loaded = [f if isinstance(f, Embedding) else
                  load_embedding(f, name=None if names is None else names[i], dim=dim)
                  for i, f in enumerate(files)]
        known = {e.name.lower(): e for e in getattr(self, "embeddings", ())}
        for e in loaded:
            if e.vectors.shape[1] != dim:
                raise UserInputError(f"embedding {e.name!r} is {e.vectors.shape[1]} wide, this "
                                     f"text encoder is {dim}")
            if not self.components.tokenizer.encode(e.name):
                raise UserInputError(f"embedding name {e.name!r} has no CLIP tokens")
            if e.name.lower() in known:
                raise UserInputError(f"two embeddings are named {e.name!r}")
            known[e.name.lower()] = e
        new = copy.copy(self)
        new.embeddings = tuple(known.values())
        return new

    @property
    def clip(self) -> "ClipModel | None":
        """The CLIP (ldm_engine.clip) that scores this pipeline's images: the one with_clip
        gave, else the model folder's own (image_encoder/ beside the text encoder: has_clip),
        loaded on first use, once, on this pipeline's device in fp32; None when there is none."""
        return self._clip.get(self)

    def with_clip(self, clip: "ClipModel | str | os.PathLike"):
        """This pipeline (same networks, not copied) scoring its images with another CLIP: a
        ClipModel, or any source ldm_engine.clip.load_clip reads (a model folder with an image
        encoder, a transformers CLIPModel folder, an open_clip checkpoint file), loaded now.

        A new pipeline object, as with_embeddings makes: this one is unchanged.
        """
        from ldm_engine.clip import ClipModel, load_clip

        if isinstance(clip, (str, os.PathLike)):
            clip = load_clip(clip, device=self.device)
        elif not isinstance(clip, ClipModel):
            raise UserInputError(f"with_clip takes a ClipModel or a path, got "
                                 f"{type(clip).__name__}")
        new = copy.copy(self)
        new._clip = _ClipSlot(clip)
        return new

    def guidance(self, prompts: list[str], negatives: list[str], scale: float,
                 clip_skip: int = 1) -> Guidance:
        if scale == 1.0:
            return Guidance(scale, self.encode_text(prompts, clip_skip), None)
        # Encoded together, so cond and uncond have the same number of windows.
        states = self.encode_text(prompts + negatives, clip_skip)
        n = len(prompts)
        return Guidance(scale, states[:n], states[n:])

    # --- the shared run -------------------------------------------------------------------

    @torch.inference_mode()
    def run(self, request: GenerationParams | Sequence[GenerationParams], *,
            num_images: int = 1,
            generator: torch.Generator | Sequence[torch.Generator] | None = None,
            observer: Observer | Sequence[Observer] | None = None, progress: bool = False,
            allow_large: bool = False, rerank_batch: int | None = None) -> GenerationResult:
        """Make the images a request (or several, as one batch) describes; any mode.

        Image j of a request is made with seed + j (A1111's convention), so it equals a single
        generation with that seed. Every error in the input is raised before any network runs.
        The mode (request.mode: pipelines.registry) only prepares the starting latents, the plan
        and an optional step hook; prompts, guidance, generators, the loop, the decode and the
        result are done here, for all modes alike. allow_large: see check_generation_size.

        A request with rerank N > 1 makes N candidates of each image and keeps the one this
        pipeline's CLIP scores best (pipelines.rerank), generating at most `rerank_batch`
        candidates at a time (default: as many as the memory check allows).
        """
        from .registry import mode_of

        requests = [request] if isinstance(request, GenerationParams) else list(request)
        if not requests or not all(isinstance(r, GenerationParams) for r in requests):
            raise UserInputError("run() takes a request (pipelines.params) or a list of them")
        mode = mode_of(requests[0])
        if any(type(r) is not type(requests[0]) for r in requests):
            raise UserInputError("one batch runs one mode: the requests are of different types")
        check_count("num_images", num_images)
        if not isinstance(allow_large, bool):
            raise UserInputError(f"allow_large must be True or False, got {allow_large!r}")
        images = [image for r in requests for image in mode.expand(r, num_images)]
        if any(mode.shared(r) != mode.shared(images[0]) for r in images):
            raise UserInputError("requests in one batch may differ only in prompt, negative "
                                 "prompt and seed")
        if rerank_batch is not None:
            check_count("rerank_batch", rerank_batch)
        check_rerank(images[0].rerank)
        if images[0].rerank > 1:
            from .rerank import run_reranked
            return run_reranked(self, mode, images, generator=generator, observer=observer,
                                progress=progress, allow_large=allow_large,
                                rerank_batch=rerank_batch)
        batch = self._batch(mode, images, generator, allow_large)
        observers = as_observers(observer)
        if progress:
            from .observe import ProgressBar
            observers.append(ProgressBar(batch.sampler.name))
        return self._generate(mode, batch, observers)

    def _generate(self, mode: Mode, batch: Batch, observers: list[Observer]
                  ) -> GenerationResult:
        """The images of a checked batch: the mode's start, the loop (every pass), the decode."""
        first = batch.first
        images = list(batch.requests)
        start = mode.prepare(self, batch)
        guidance = start.guidance or self.guidance(
            [r.prompt for r in images], [r.negative_prompt for r in images],
            first.guidance_scale, first.clip_skip)
        for o in observers:
            o.on_start(start.passes)
        try:
            k = 0
            while True:
                unet = self._conditioned(self.denoiser(), start.conditioning)
                d = make_denoiser(guidance.model(unet), batch.schedule,
                                  self.components.schedule.prediction_type)
                latents = denoise(d, start.latents, sampler=batch.sampler, plan=start.plan,
                                  generators=batch.generators, eta=batch.eta, on_step=start.hook,
                                  observers=observers, decode=self.decode, pass_index=k,
                                  passes=start.passes)
                if start.then is None:
                    break
                start, k = start.then(latents), k + 1
                guidance = start.guidance or guidance
        finally:
            for o in observers:
                o.on_end()
        pixels = self.decode(latents)
        if start.finish is not None:
            pixels = start.finish(pixels)
        made_with = dict(self.pixel_settings(), model=self.name, model_hash=self.model_hash)
        params = [r.replace(height=batch.height, width=batch.width, eta=batch.eta,
                            sampler=batch.sampler.name, seed=seed, **made_with)
                  # The seed each image records: its request's, or its user generator's.
                  for r, seed in zip(images, [g.initial_seed() for g in batch.generators])]
        return GenerationResult(self.to_pil(pixels), pixels.cpu(), latents.float().cpu(), params)

    def regenerate(self, params: GenerationParams, *, progress: bool = True,
                   allow_large: bool = False, observer=None) -> GenerationResult:
        """Make the image a request read back from a PNG describes (any mode; image modes need
        their images put back into it: params.replace(init_image=...)).

        The model, its dtype and the approximations are fixed when the pipeline is loaded; load
        it with ``from_folder(path, dtype=params.dtype, deep_cache=params.deep_cache,
        vae_tiling=params.vae_tiling)`` to match them (the CLI's --from-image does). Where this
        pipeline differs, the image is still made, with an InexactRemakeWarning naming how.
        """
        from .pnginfo import InexactRemakeWarning

        result = self.run(params, progress=progress, allow_large=allow_large, observer=observer)
        differences = _differences(params, result.params[0])
        if differences:
            warnings.warn(InexactRemakeWarning(
                f"this pipeline differs from what made the image ({'; '.join(differences)}): "
                "the image will differ"), stacklevel=2)
        return result

    def _batch(self, mode, images: list[GenerationParams], generator, allow_large: bool) -> Batch:
        """Every check of a batch, the model's included, and its generators: before compute."""
        c = self.components
        first = images[0]
        first.check_mode(c.vae_factor)
        height, width = mode.size(self, first)
        eta = first.eta
        if eta is None:         # the sampler's own (1 for euler_a and the SDE samplers)
            try:
                eta = get_sampler(first.sampler).default_eta
            except ValueError:
                eta = 0.0       # an unknown sampler: check_request names it
        from .pnginfo import check_storable

        check_storable([r.prompt for r in images])
        check_storable([r.negative_prompt for r in images], "negative prompt")
        check_request(steps=first.steps, guidance_scale=first.guidance_scale,
                      sampler=first.sampler, eta=eta, height=height, width=width,
                      vae_factor=c.vae_factor, num_images=len(images), schedule=c.schedule,
                      clip_skip=first.clip_skip,
                      text_layers=c.text_encoder.config.num_hidden_layers)
        for r in images:
            check_seed(r.seed)
        out_h, out_w = mode.largest(self, first, height, width)
        self.check_generation_size(height=out_h, width=out_w, num_images=len(images),
                                   guided=first.guidance_scale != 1.0, allow_large=allow_large)
        if generator is not None:
            generators, _ = make_generators(len(images), None, generator)
        else:
            generators = [torch.Generator("cpu").manual_seed(int(r.seed)) for r in images]
        batch = Batch(requests=tuple(images), generators=generators, height=int(height),
                      width=int(width), eta=float(eta), sampler=get_sampler(first.sampler),
                      schedule=train_schedule(c.schedule))
        mode.check(self, batch)
        return batch

    @staticmethod
    def _conditioned(unet: UNetFn, conditioning: torch.Tensor | None) -> UNetFn:
        """The UNet reading `conditioning` channels after the latents (9-channel inpainting:
        [x, mask, masked-image latents], as diffusers concatenates them). Guidance stacks
        (uncond; cond) on the batch axis, so the conditioning is repeated to x's batch."""
        if conditioning is None:
            return unet

        def conditioned(x: torch.Tensor, t: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
            extra = conditioning.to(x.dtype).repeat(x.shape[0] // conditioning.shape[0], 1, 1, 1)
            return unet(torch.cat([x, extra], dim=1), t, states)

        return conditioned

    def encode(self, pixels: torch.Tensor, generators: Sequence[torch.Generator] | None = None
               ) -> torch.Tensor:
        """Images in [-1, 1], (B, 3, H, W) -> scaled latents (B, C, H/f, W/f) float32.

        With generators, each image's latent is a draw from the VAE's posterior N(mean, std^2)
        with its own generator (diffusers' retrieve_latents, sample_mode "sample"); without, the
        posterior mean (sample_mode "argmax"). The latents are scaled (and shifted) as the UNet
        sees them.
        """
        vae = self.components.vae
        use = vae
        if vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
            use = self._fp32_encoder()
        x = pixels.to(device=self.device, dtype=use.dtype)
        rows = []
        for b in range(x.shape[0]):
            dist = use.encode(x[b:b + 1]).latent_dist
            if generators is None:
                rows.append(dist.mode())
            else:
                # A CPU draw, so a seed means the same latent on any device (as the loop's noise).
                z = torch.randn(dist.mean.shape, generator=generators[b], dtype=torch.float32)
                rows.append(dist.mean + dist.std * z.to(dist.mean.device, dist.mean.dtype))
        latents = torch.cat(rows).float()
        if getattr(vae.config, "shift_factor", None):
            latents = latents - vae.config.shift_factor
        return latents * vae.config.scaling_factor

    def _fp32_encoder(self):
        """An fp32 copy of the whole VAE, for encoding with an fp16 VAE marked force_upcast (its
        encoder overflows fp16 as its decoder does); made once, never changed after."""
        vae = self.components.vae
        cached = getattr(self, "_vae_fp32_full", None)
        if cached is None or cached[0] is not vae:
            with _FP32_VAE_LOCK:
                cached = getattr(self, "_vae_fp32_full", None)
                if cached is None or cached[0] is not vae:
                    cached = (vae, torch.nn.Module.float(copy.deepcopy(vae)))
                    self._vae_fp32_full = cached
        return cached[1]

    def unet_fn(self, x: torch.Tensor, t: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        out = self.components.unet(x.to(self.dtype), t, encoder_hidden_states=states,
                                   return_dict=False)[0]
        return out.float()

    def denoiser(self) -> UNetFn:
        """The UNet callable for one generation (a fresh one: deep-cache state is per generation)."""
        return self.accelerated.denoiser() if self.accelerated is not None else self.unet_fn

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [0, 1], (B, 3, H, W) float32; never inf/NaN.

        fp16 has a largest value of 65504, and the SD VAE decoder's activations exceed it (the
        reason diffusers marks it `force_upcast`), so such a VAE decodes in fp32 when loaded in
        fp16. Any other reduced-precision decode that comes out non-finite is redone in fp32.
        Safe to call from many threads at once: the shared networks are only read.
        """
        if not torch.isfinite(latents).all():
            raise NonFiniteError(
                f"the UNet produced inf/NaN latents in {self.dtype}; this model needs a wider "
                "dtype (bf16 or fp32)")
        vae = self.components.vae
        z = latents / vae.config.scaling_factor
        if getattr(vae.config, "shift_factor", None):
            z = z + vae.config.shift_factor
        if vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
            images = self._decode_fp32(z)
        else:
            images = self._vae_decode(z.to(vae.dtype))
            if vae.dtype != torch.float32 and not torch.isfinite(images).all():
                log.warning("VAE decode overflowed in %s; decoding again in fp32", vae.dtype)
                images = self._decode_fp32(z)
        # The VAE's output lives in [-1, 1].
        return (images.float() / 2 + 0.5).clamp(0, 1)

    def _vae_decode(self, z: torch.Tensor) -> torch.Tensor:
        if self.accelerated is not None:
            return self.accelerated.vae_decode(z)
        return self.components.vae.decode(z, return_dict=False)[0]

    def _decode_fp32(self, z: torch.Tensor) -> torch.Tensor:
        return self._fp32_vae().decode(z.float(), return_dict=False)[0]

    def _fp32_vae(self):
        """An fp32 copy of the VAE's decoding half, made on first use and never changed after.

        The shared VAE is never re-cast: other generations may be decoding with it at the same
        moment (casting it in place made concurrent fp16/bf16 generations fail with mixed-dtype
        errors). Up-casting fp16/bf16 weights is exact, so the copy decodes exactly as the VAE
        cast to fp32 would. It costs the decoder's fp32 size once per pipeline (198 MB for SD's)
        and is only made when a decode needs it. It is a snapshot: weights edited in place after
        the first fp32 decode are not seen (a pipeline's networks are read-only while it
        generates); a VAE replaced in `components` gets a fresh copy.
        """
        vae = self.components.vae
        cached = getattr(self, "_vae_fp32", None)      # (the VAE it was made from, its copy)
        if cached is None or cached[0] is not vae:
            with _FP32_VAE_LOCK:
                cached = getattr(self, "_vae_fp32", None)
                if cached is None or cached[0] is not vae:
                    cached = (vae, _decoder_copy_fp32(vae))
                    self._vae_fp32 = cached
        return cached[1]

    @staticmethod
    def to_pil(pixels: torch.Tensor) -> list[Image.Image]:
        arr = (pixels.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype("uint8")
        return [Image.fromarray(a) for a in arr]


class _ClipSlot:
    """A pipeline's CLIP: given, or loaded from the pipeline's folder on first use (once, under
    a lock, so concurrent generations never load it twice); None when the folder has none."""

    def __init__(self, clip: "ClipModel | None" = None):
        self._clip = clip
        self._loaded = clip is not None
        self._lock = threading.Lock()

    def get(self, pipe: Pipeline) -> "ClipModel | None":
        if self._loaded:
            return self._clip
        with self._lock:
            if not self._loaded:
                from ldm_engine.clip import has_clip, load_clip

                source = pipe.source
                if source is not None and source.is_dir() and has_clip(source):
                    self._clip = load_clip(source, device=pipe.device)
                self._loaded = True
            return self._clip
