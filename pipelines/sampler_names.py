"""AUTOMATIC1111's sampler display names, read and written beside the engine's registry names.

The engine names a sampler by its registry key (``schedulers.SAMPLERS``: ``euler_a``,
``dpmpp_2m_karras``, ...). A1111 shows and writes display names, and has written them two ways:

- before 1.9 (2024) the sigma spacing was part of the name: ``Sampler: DPM++ 2M Karras``; a name
  without a spacing (``DPM++ 2M``) meant k-diffusion's ``get_sigmas`` (t linear from T - 1 to
  0), the registry's ``_normal`` spacing;
- from 1.9 on the name is the stepper alone and the spacing is a separate field:
  ``Sampler: DPM++ 2M, Schedule type: Karras``. Its ``Automatic`` schedule is each sampler's own
  default (``options['scheduler']`` in A1111's ``modules/sd_samplers_kdiffusion.py``): Karras for
  DPM++ 2M, DPM++ SDE, DPM++ 2S a, DPM2 and DPM2 a, exponential for DPM++ 2M SDE, ``Uniform``
  (``get_sigmas`` again, = ``_normal``) for the rest; its ``Normal`` is the same spacing.

So a display name means what A1111 computes: ``Euler`` is ``euler_normal``, ``DPM++ 2M Karras`` is
``dpmpp_2m_karras``. Both forms are read (a spacing suffix on the name wins over the field, as
A1111 reads them). The engine writes the combined name, which every A1111 version reads the same
way, plus ``Schedule type: Uniform`` for a ``_normal`` sampler whose 1.9+ ``Automatic`` is not
uniform (``dpmpp_2m_normal`` -> ``Sampler: DPM++ 2M, Schedule type: Uniform``). The plain k-family
names (``euler``, ``dpmpp_2m``: the timesteps diffusers' scheduler picks from the model's
timestep_spacing, "leading" for SD 1.x) have no A1111 counterpart; they are written
``Schedule type: Diffusers`` (A1111 falls back to its Automatic, a slightly different image) and
read back exactly. DDIM, DDPM, UniPC and LCM have no spacing variants; A1111's ``Automatic`` /
``Uniform`` / ``Normal`` beside them are accepted. A1111's legacy aliases (``k_euler_a``,
``k_dpmpp_2m_ka``) are read too. ``diffusers:<SchedulerClass>`` names
(schedulers.diffusers_adapter) are written and read as they are.

Only samplers in the registry are accepted; an unknown name is a one-line UserInputError that
lists every valid name in both spellings.
"""

from __future__ import annotations

from schedulers import SAMPLERS

from ldm_engine.errors import UserInputError

# Registry stepper -> A1111 display name of the stepper (labels of sd_samplers_kdiffusion.py and
# sd_samplers_timesteps.py; DDPM is the engine's own, A1111 has none).
STEPPER_NAMES = {
    "euler": "Euler", "euler_a": "Euler a", "heun": "Heun", "dpm2": "DPM2", "dpm2_a": "DPM2 a",
    "lms": "LMS", "dpmpp_2m": "DPM++ 2M", "dpmpp_2m_sde": "DPM++ 2M SDE",
    "dpmpp_sde": "DPM++ SDE", "dpmpp_2s_a": "DPM++ 2S a", "unipc": "UniPC", "lcm": "LCM",
    "ddim": "DDIM", "ddpm": "DDPM",
}
# Registry spacing suffix -> A1111 schedule label. "" (the model's timestep spacing, diffusers'
# choice) has none in A1111: "Diffusers" is this engine's label for it.
SCHEDULE_SUFFIXES = {"_normal": "Uniform", "_karras": "Karras", "_exponential": "Exponential",
                     "_polyexponential": "Polyexponential", "": "Diffusers"}
# A1111 labels read as another: its "Normal" schedule is get_sigmas too.
_LABEL_ALIASES = {"normal": "uniform"}
# A1111 >= 1.9: the schedule "Automatic" stands for, where it is not Uniform.
A1111_AUTOMATIC = {"dpmpp_2m": "Karras", "dpmpp_sde": "Karras", "dpmpp_2s_a": "Karras",
                   "dpm2": "Karras", "dpm2_a": "Karras", "dpmpp_2m_sde": "Exponential"}
# A1111's legacy aliases (the third column of its sampler tables), read only.
_A1111_ALIASES = {
    "k_euler_a": "euler_a", "k_euler_ancestral": "euler_a", "k_euler": "euler", "k_lms": "lms",
    "k_heun": "heun", "k_dpm_2": "dpm2", "k_dpm_2_a": "dpm2_a", "k_dpmpp_2s_a": "dpmpp_2s_a",
    "k_dpmpp_2m": "dpmpp_2m", "k_dpmpp_sde": "dpmpp_sde", "k_dpmpp_2m_sde": "dpmpp_2m_sde",
    "k_lms_ka": "lms_karras", "k_dpm_2_ka": "dpm2_karras", "k_dpm_2_a_ka": "dpm2_a_karras",
    "k_dpmpp_2s_a_ka": "dpmpp_2s_a_karras", "k_dpmpp_2m_ka": "dpmpp_2m_karras",
    "k_dpmpp_sde_ka": "dpmpp_sde_karras", "k_dpmpp_2m_sde_ka": "dpmpp_2m_sde_karras",
}
DIFFUSERS_PREFIX = "diffusers:"


def split_name(name: str) -> tuple[str, str]:
    """Registry name -> (stepper, suffix): ``dpmpp_2m_karras`` -> ("dpmpp_2m", "_karras")."""
    for suffix in SCHEDULE_SUFFIXES:
        if suffix and name.endswith(suffix) and name[: -len(suffix)] in STEPPER_NAMES:
            return name[: -len(suffix)], suffix
    return name, ""


def _spaced(stepper: str) -> bool:
    """Whether the stepper has spacing variants (the k-diffusion family), e.g. euler_karras."""
    return any(f"{stepper}{s}" in SAMPLERS for s in SCHEDULE_SUFFIXES if s)


def a1111_fields(name: str) -> tuple[str, str | None]:
    """(``Sampler`` value, ``Schedule type`` value or None) to write for a registry name."""
    stepper, suffix = split_name(name)
    if stepper not in STEPPER_NAMES:
        return name, None                   # diffusers:<Class>, or a name A1111 lacks
    display = STEPPER_NAMES[stepper]
    if not _spaced(stepper):
        return display, None
    if suffix == "":
        return display, SCHEDULE_SUFFIXES[""]
    if suffix == "_normal":
        return display, "Uniform" if stepper in A1111_AUTOMATIC else None
    return f"{display} {SCHEDULE_SUFFIXES[suffix]}", None


def display_name(name: str) -> str:
    """How A1111 shows a registry name: ``dpmpp_2m_karras`` -> ``DPM++ 2M Karras``,
    ``euler_normal`` -> ``Euler``, ``euler`` -> ``Euler, Schedule type: Diffusers``."""
    sampler, schedule = a1111_fields(name)
    if schedule is None or schedule == "Uniform":
        return sampler
    return f"{sampler}, Schedule type: {schedule}"


def sampler_names() -> dict[str, str]:
    """Every registered sampler: registry name -> A1111 display name."""
    return {name: display_name(name) for name in SAMPLERS}


def valid_names() -> str:
    """``ddim (DDIM), euler_a_normal (Euler a), ...``: both spellings, for error messages."""
    # The model-spacing k-samplers (euler, dpmpp_2m, ...) have no A1111 name of their own.
    parts = [f"{n} ({d})" if d != n and "Schedule type" not in d else n
             for n, d in sorted(sampler_names().items())]
    return ", ".join(parts + [f"{DIFFUSERS_PREFIX}<SchedulerClass>"])


def _unknown(text) -> UserInputError:
    return UserInputError(f"unknown sampler {text!r}; valid samplers: {valid_names()}")


def resolve_sampler(name: str) -> str:
    """A registry name, an A1111 display name or legacy alias -> the registry name.

    Order: the registry name as written, A1111's display name as written (``Euler`` is A1111's
    Euler, ``euler_normal``), then both in any case, then the aliases."""
    if not isinstance(name, str):
        raise _unknown(name)
    if name in SAMPLERS or name.startswith(DIFFUSERS_PREFIX):
        return name
    try:
        return from_a1111(name.strip())
    except UserInputError:
        pass
    folded = name.strip().lower()
    by_name = {n.lower(): n for n in SAMPLERS}
    if folded in by_name:
        return by_name[folded]
    raise _unknown(name)


def _stepper_of(display: str) -> tuple[str, str | None]:
    """An A1111 ``Sampler`` value -> (stepper, spacing suffix named in it or None)."""
    folded = display.strip().lower()
    for stepper, label in STEPPER_NAMES.items():
        if folded == label.lower():
            return stepper, None
    for stepper, label in STEPPER_NAMES.items():
        for suffix, schedule in SCHEDULE_SUFFIXES.items():
            if suffix and folded == f"{label} {schedule}".lower():
                return stepper, suffix
            if suffix == "_normal" and folded == f"{label} normal".lower():
                return stepper, suffix
    alias = _A1111_ALIASES.get(folded)
    if alias is not None:
        return split_name(alias)[0], split_name(alias)[1] or "_normal"
    raise _unknown(display)


def from_a1111(sampler: str, schedule_type: str | None = None) -> str:
    """The registry name for A1111's ``Sampler`` and (1.9+) ``Schedule type`` fields.

    A spacing suffix on the sampler name ("DPM++ 2M Karras") wins over the field, as in A1111's
    own reader; ``Automatic`` is resolved as A1111 resolves it; no field with a plain name means
    pre-1.9 A1111: k-diffusion's get_sigmas (``_normal``). A registry name is itself.
    """
    if sampler.startswith(DIFFUSERS_PREFIX) or sampler in SAMPLERS:
        return sampler
    stepper, suffix = _stepper_of(sampler)
    if suffix is None:
        folded = "uniform" if schedule_type is None else schedule_type.strip().lower()
        folded = _LABEL_ALIASES.get(folded, folded)
        if folded == "automatic":
            folded = A1111_AUTOMATIC.get(stepper, "Uniform").lower()
        labels = {label.lower(): s for s, label in SCHEDULE_SUFFIXES.items()}
        if folded not in labels:
            raise UserInputError(
                f"schedule type {schedule_type!r} is not one this engine has; it has Automatic, "
                f"{', '.join(SCHEDULE_SUFFIXES.values())} and Normal (= Uniform)")
        suffix = labels[folded]
    if not _spaced(stepper):
        if suffix in ("", "_normal"):       # DDIM / UniPC / LCM beside Automatic or Uniform
            return _registered(stepper, sampler, schedule_type)
        return _registered(stepper + suffix, sampler, schedule_type)
    return _registered(stepper + suffix, sampler, schedule_type)


def _registered(name: str, sampler: str, schedule_type: str | None) -> str:
    if name in SAMPLERS:
        return name
    where = f"{sampler!r}" + (f" with schedule type {schedule_type!r}" if schedule_type else "")
    raise UserInputError(f"sampler {where} ({name}) is not available; valid samplers: "
                         f"{valid_names()}")
