"""AUTOMATIC1111 sampler display names: written, read in both A1111 forms, refused when unknown.

The name logic is tested against a registry holding every sampler the issue names (all spacing
variants), so it does not depend on which samplers are registered yet; the real registry is checked
for display names separately.
"""

from __future__ import annotations

import pytest

import pipelines.sampler_names as names
from ldm_engine.apps.cli import main
from ldm_engine.errors import UserInputError
from pipelines.txt2img import default_eta
from pipelines import GenerationParams
from pipelines.pnginfo import (InexactRemakeWarning, format_parameters, parse_parameters,
                              read_png_text)
from schedulers import SAMPLERS

PLAIN = ["euler", "euler_a", "heun", "dpm2", "dpm2_a", "lms", "dpmpp_2m", "dpmpp_2m_sde",
         "dpmpp_sde", "dpmpp_2s_a", "unipc", "lcm", "ddim", "ddpm"]
SPACED = ["euler", "heun", "dpm2", "dpm2_a", "lms", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_sde",
          "dpmpp_2s_a", "euler_a"]
FULL = {n: object() for n in PLAIN + [f"{s}{v}" for s in SPACED
                                      for v in ("_normal", "_karras", "_exponential",
                                                "_polyexponential")]}

# A1111's own labels (modules/sd_samplers_kdiffusion.py, sd_samplers_timesteps.py).
# A display name means what A1111 computes: its plain k-samplers use get_sigmas, our "_normal".
DISPLAY = {
    "euler_normal": "Euler", "euler_a_normal": "Euler a", "heun_normal": "Heun",
    "dpm2_normal": "DPM2", "dpm2_a_normal": "DPM2 a", "lms_normal": "LMS",
    "dpmpp_2m_normal": "DPM++ 2M", "dpmpp_2m_karras": "DPM++ 2M Karras",
    "dpmpp_sde_karras": "DPM++ SDE Karras", "dpmpp_2m_sde_normal": "DPM++ 2M SDE",
    "dpmpp_2m_sde_karras": "DPM++ 2M SDE Karras", "dpmpp_2s_a_normal": "DPM++ 2S a",
    "dpmpp_2s_a_karras": "DPM++ 2S a Karras", "dpm2_a_karras": "DPM2 a Karras",
    "lms_karras": "LMS Karras", "euler_exponential": "Euler Exponential", "unipc": "UniPC",
    "lcm": "LCM", "ddim": "DDIM", "ddpm": "DDPM",
}


@pytest.fixture
def full(monkeypatch):
    monkeypatch.setattr(names, "SAMPLERS", FULL)


def _params(sampler: str) -> GenerationParams:
    return GenerationParams(prompt="p", steps=3, sampler=sampler, height=8, width=8, seed=1,
                            eta=default_eta(sampler))


@pytest.mark.parametrize("name, display", DISPLAY.items())
def test_display_names_are_a1111s(full, name, display):
    assert names.display_name(name) == display
    assert names.resolve_sampler(display) == name
    assert names.resolve_sampler(display.upper()) == name


def test_plain_k_samplers_name_their_diffusers_spacing(full):
    assert names.display_name("euler") == "Euler, Schedule type: Diffusers"
    assert names.resolve_sampler("euler") == "euler"          # the registry name as written
    assert names.resolve_sampler("Euler") == "euler_normal"   # A1111's Euler


def test_every_sampler_round_trips_through_png_text(full):
    for name in FULL:
        text = format_parameters(_params(name))
        assert parse_parameters(text).sampler == name, text


@pytest.mark.parametrize("name, fields", [
    ("euler_a_normal", "Sampler: Euler a, CFG scale"),
    ("dpmpp_2m_karras", "Sampler: DPM++ 2M Karras, CFG scale"),
    # A1111 >= 1.9 reads a bare "DPM++ 2M" as Karras (its Automatic): say Uniform.
    ("dpmpp_2m_normal", "Sampler: DPM++ 2M, Schedule type: Uniform, CFG scale"),
    ("dpmpp_2m_sde_normal", "Sampler: DPM++ 2M SDE, Schedule type: Uniform, CFG scale"),
    ("dpm2_a_normal", "Sampler: DPM2 a, Schedule type: Uniform, CFG scale"),
    ("euler_normal", "Sampler: Euler, CFG scale"),
    # The model's timestep spacing (diffusers' choice) has no A1111 schedule: our own label.
    ("euler", "Sampler: Euler, Schedule type: Diffusers, CFG scale"),
    ("dpmpp_2m", "Sampler: DPM++ 2M, Schedule type: Diffusers, CFG scale"),
    ("ddim", "Sampler: DDIM, CFG scale"),
])
def test_written_fields(full, name, fields):
    assert fields in format_parameters(_params(name))


@pytest.mark.parametrize("sampler, schedule, expected", [
    ("DPM++ 2M", None, "dpmpp_2m_normal"),               # pre-1.9 A1111: get_sigmas
    ("DPM++ 2M", "Karras", "dpmpp_2m_karras"),           # 1.9+ form
    ("DPM++ 2M", "Automatic", "dpmpp_2m_karras"),        # 1.9+ default for DPM++ 2M
    ("DPM++ 2M", "Uniform", "dpmpp_2m_normal"),
    ("DPM++ 2M", "Normal", "dpmpp_2m_normal"),           # A1111's Normal is get_sigmas too
    ("DPM++ 2M", "Diffusers", "dpmpp_2m"),               # what this engine writes for it
    ("DPM++ 2M SDE", "Automatic", "dpmpp_2m_sde_exponential"),
    ("DPM++ SDE", "karras", "dpmpp_sde_karras"),         # labels in any case
    ("Euler a", "Automatic", "euler_a_normal"),
    ("Euler", "Exponential", "euler_exponential"),
    ("LMS", "Polyexponential", "lms_polyexponential"),
    ("DPM++ 2M Karras", "Automatic", "dpmpp_2m_karras"),  # a suffix wins, as in A1111
    ("DPM++ 2M Karras", None, "dpmpp_2m_karras"),
    ("DDIM", "Automatic", "ddim"),
    ("UniPC", "Automatic", "unipc"),
    ("k_dpmpp_2m_ka", None, "dpmpp_2m_karras"),           # A1111's legacy aliases
    ("k_euler_a", None, "euler_a_normal"),
    ("dpmpp_2m_karras", None, "dpmpp_2m_karras"),         # the registry name itself
])
def test_both_a1111_forms_are_read(full, sampler, schedule, expected):
    assert names.from_a1111(sampler, schedule) == expected
    line = f"Steps: 3, Sampler: {sampler}, " + (f"Schedule type: {schedule}, " if schedule else "")
    assert parse_parameters(f"x\n{line}CFG scale: 7, Seed: 1, Size: 8x8").sampler == expected


def test_unknown_names_list_both_spellings(full):
    with pytest.raises(UserInputError) as e:
        names.resolve_sampler("DPM fast")
    message = str(e.value)
    assert message.startswith("unknown sampler 'DPM fast'; valid samplers: ")
    assert "dpmpp_2m_karras (DPM++ 2M Karras)" in message and "euler_a_normal (Euler a)" in message
    assert ", euler_a, " in message
    assert "\n" not in message


@pytest.mark.parametrize("sampler, schedule, match", [
    ("DPM++ 2M", "SGM Uniform", "schedule type 'SGM Uniform' is not one"),
    ("DDIM", "Karras", r"'DDIM' with schedule type 'Karras' \(ddim_karras\) is not available"),
])
def test_schedules_we_lack_are_refused(full, sampler, schedule, match):
    with pytest.raises(UserInputError, match=match):
        names.from_a1111(sampler, schedule)


def test_png_with_a_sampler_we_lack_keeps_its_name_for_the_pipeline_to_refuse(full):
    # The request may override the sampler (ldm generate --from-image --sampler), so reading
    # does not fail; the pipeline's check then names it, schedule type included.
    text = "x\nSteps: 3, Sampler: DPM++ 2M, Schedule type: Align Your Steps, CFG scale: 7, " \
           "Seed: 1, Size: 8x8"
    assert parse_parameters(text).sampler == "DPM++ 2M Align Your Steps"
    with pytest.raises(UserInputError, match="unknown sampler 'DPM fast Align Your Steps'"):
        _params(parse_parameters(text.replace("DPM++ 2M", "DPM fast")).sampler).validate()


def test_every_registered_sampler_has_an_a1111_name():
    # A sampler added to the registry without a display name would be written as its key.
    missing = [n for n in SAMPLERS if names.split_name(n)[0] not in names.STEPPER_NAMES]
    assert not missing


@pytest.mark.parametrize("given", ["DDPM", "ddpm", "Ddpm"])
def test_cli_takes_display_names(tiny_dir, tmp_path, capsys, given):
    out = tmp_path / "o.png"
    argv = ["generate", "a", "--model", str(tiny_dir), "--out", str(out), "--quiet", "--steps",
            "2", "--seed", "1", "--sampler", given, "--height", "32", "--width", "32"]
    assert main(argv) == 0
    assert "Sampler: DDPM," in read_png_text(out)


def test_cli_unknown_sampler_lists_both_spellings(tiny_dir, tmp_path, capsys):
    argv = ["generate", "a", "--model", str(tiny_dir), "--out", str(tmp_path / "o.png"),
            "--sampler", "Euler CFG++"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "unknown sampler 'Euler CFG++'; valid samplers: ddim (DDIM), ddpm (DDPM)" in err


@pytest.mark.parametrize("sampler, eta, field", [
    ("euler_a", 1.0, None),                 # A1111's default eta for ancestral samplers
    ("euler_a", 0.5, "Eta: 0.5"),
    ("dpmpp_sde_karras", 0.0, "Eta: 0.0"),
    ("ddim", 0.0, None),
    ("ddim", 0.3, "Eta DDIM: 0.3"),
])
def test_eta_is_written_under_a1111s_name_for_the_sampler(sampler, eta, field):
    p = _params(sampler).replace(eta=eta)
    line = format_parameters(p).split("\n")[-1]
    eta_fields = [f for f in line.split(", ") if f.startswith("Eta")]
    assert eta_fields == ([field] if field else [])
    assert parse_parameters(format_parameters(p)) == p


def test_a1111_ancestral_eta_is_read_and_the_other_eta_is_named():
    p = parse_parameters("x\nSteps: 3, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 8x8")
    assert (p.sampler, p.eta) == ("euler_a_normal", 1.0)
    p = parse_parameters("x\nSteps: 3, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 8x8, "
                         "Eta: 0.67")
    assert p.eta == 0.67
    with pytest.warns(InexactRemakeWarning, match=r"does not have, ignored .*: Eta DDIM$"):
        p = parse_parameters("x\nSteps: 3, Sampler: DPM++ SDE Karras, CFG scale: 7, Seed: 1, "
                             "Size: 8x8, Eta DDIM: 0.2")
    assert (p.sampler, p.eta) == ("dpmpp_sde_karras", 1.0)


def test_diffusers_scheduler_names_round_trip():
    p = _params("diffusers:EulerDiscreteScheduler")
    text = format_parameters(p)
    assert 'Sampler: "diffusers:EulerDiscreteScheduler", ' in text
    assert parse_parameters(text) == p
