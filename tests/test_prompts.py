"""A1111 prompts: attention weights, BREAK, 75-token windows, CLIP skip (pipelines.prompts).

References: AUTOMATIC1111's own docstring of parse_prompt_attention (its worked examples restated
here as data), its tokenize_line windowing rule (restated as explicit token layouts), its
"Original" emphasis (restated as tensor arithmetic on windows encoded one by one through
CLIPTextModel), and diffusers' StableDiffusionPipeline.encode_prompt for CLIP skip.
"""

import copy

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

from ldm_engine.apps.cli import main
from ldm_engine.errors import UserInputError
from pipelines import TextToImage, read_png_params
from pipelines.params import GenerationParams
from pipelines.pnginfo import format_parameters, parse_parameters
from pipelines.prompts import (BREAK, COMMA_BACKTRACK, Fragment, apply_weights, encode_prompts,
                               parse_attention, prompt_windows)


def _pairs(prompt):
    return [("BREAK", -1) if f is BREAK else (f.text, f.weight) for f in parse_attention(prompt)]


# --- the parser ----------------------------------------------------------------------------

# A1111 modules/prompt_parser.py, the docstring of parse_prompt_attention: input -> output. The
# floats are the exact products A1111 prints (1.3 * 1.1 * 1.1 = 1.5730000000000004), so the order
# in which nested factors multiply is part of what is checked.
A1111_EXAMPLES = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1),
      ("hill", 0.55), (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
]


@pytest.mark.parametrize("prompt,expected", A1111_EXAMPLES)
def test_a1111_docstring_examples(prompt, expected):
    assert _pairs(prompt) == expected


TRICKY = [
    ("", [("", 1.0)]),
    ("((a))", [("a", 1.1 * 1.1)]),
    ("[[a]]", [("a", (1 / 1.1) * (1 / 1.1))]),
    ("([a])", [("a", (1 / 1.1) * 1.1)]),
    ("(a:1.3)", [("a", 1.3)]),
    ("(a : 1.3 )", [("a ", 1.3)]),          # blanks around the number are A1111's too
    ("(a:-0.5)", [("a", -0.5)]),
    ("((a:2):3)", [("a", 6.0)]),
    # Unbalanced: an unmatched closer is a literal character...
    ("a) b] c", [("a) b] c", 1.0)]),
    # ... an opener never closed applies its factor to the end of the prompt...
    ("a (b [c", [("a ", 1.0), ("b ", 1.1), ("c", 1.1 / 1.1)]),
    # ... and a weight with no "(" open is literal text, as is a ":" without a number.
    ("x:1.5) y", [("x:1.5) y", 1.0)]),
    ("(a: b)", [("a: b", 1.1)]),
    # [text:1.5] is not a weight (only round brackets take one): literal ":1.5" inside [ ].
    ("[a:1.5]", [("a:1.5", 1 / 1.1)]),
    # Escapes; a lone backslash before another character is dropped (A1111 too).
    ("\\\\", [("\\", 1.0)]),
    ("\\(a\\)", [("(a)", 1.0)]),
    ("(\\(a\\))", [("(a)", 1.1)]),
    ("a\\b", [("ab", 1.0)]),
    # Adjacent fragments of equal weight merge; weight 1.0 merges into its neighbours.
    ("(a:1.0) b", [("a b", 1.0)]),
    ("(a)(b:1.1)", [("ab", 1.1)]),
    # BREAK: upper case, a word of its own, blanks around it dropped.
    ("a BREAK b", [("a", 1.0), ("BREAK", -1), ("b", 1.0)]),
    ("BREAK a", [("", 1.0), ("BREAK", -1), ("a", 1.0)]),
    ("a break b, aBREAK, BREAKfast", [("a break b, aBREAK, BREAKfast", 1.0)]),
    ("a BREAK BREAK b", [("a", 1.0), ("BREAK", -1), ("", 1.0), ("BREAK", -1), ("b", 1.0)]),
    # Ours: BREAK inside brackets still breaks (A1111 weights the word "break" by -1.1 there).
    ("(a BREAK b)", [("a", 1.1), ("BREAK", -1), ("b", 1.1)]),
]


@pytest.mark.parametrize("prompt,expected", TRICKY)
def test_tricky_prompts(prompt, expected):
    got = _pairs(prompt)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected], rel=1e-12)


@pytest.mark.parametrize("prompt", ["(a:1.2.3)", "(a:.)", "x (y:..5) z"])
def test_a_weight_that_is_no_number_is_a_user_error(prompt):
    with pytest.raises(UserInputError, match="is not a number"):
        parse_attention(prompt)


def test_fragments_are_frozen():
    with pytest.raises(AttributeError):
        parse_attention("a")[0].weight = 2.0
    assert parse_attention("a") == (Fragment("a", 1.0),)


# --- windows -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tok(tiny_components):
    return tiny_components.tokenizer


def _body(row, tok):
    """A window's tokens between BOS and its EOS."""
    assert row[0] == tok.bos_id and len(row) == 77
    end = list(row[1:]).index(tok.eos_id) + 1
    assert all(i == tok.pad_id for i in row[end + 1:])
    return list(row[1:end])


def test_a_plain_prompt_is_the_tokenizer_row(tok):
    for prompt in ["a red circle on the left", "", "photo: a cat, 4k"]:
        w = prompt_windows(tok, prompt)
        assert list(w.ids) == [tuple(tok(prompt)[0].tolist())] and not w.weighted


def test_window_sizes_and_the_comma_rule(tok):
    a, comma = tok.encode("a")[0], tok.encode(",")[0]
    assert tok.encode("a a") == [a, a]
    # 75 tokens: one window; 76: two; 200: three.
    assert len(prompt_windows(tok, " ".join(["a"] * 75)).ids) == 1
    assert [len(_body(r, tok)) for r in prompt_windows(tok, " ".join(["a"] * 76)).ids] == [75, 1]
    long = prompt_windows(tok, " ".join(["a"] * 200))
    assert [len(_body(r, tok)) for r in long.ids] == [75, 75, 50]
    # A comma 15 tokens before the end of a full window: what follows it moves on.
    words = ["a"] * 60 + [","] + ["a"] * 30
    w = prompt_windows(tok, " ".join(words))
    assert [_body(r, tok) for r in w.ids] == [[a] * 60 + [comma], [a] * 30]
    # The rule's edge: the comma exactly COMMA_BACKTRACK tokens from the end backtracks ...
    k = 75 - COMMA_BACKTRACK
    w = prompt_windows(tok, " ".join(["a"] * k + [","] + ["a"] * 40))
    assert [len(_body(r, tok)) for r in w.ids] == [k + 1, 40]
    # ... one further does not: a hard cut at 75.
    w = prompt_windows(tok, " ".join(["a"] * (k - 1) + [","] + ["a"] * 40))
    assert [len(_body(r, tok)) for r in w.ids] == [75, k - 1 + 1 + 40 - 75]
    # A comma that would be token 76 opens the next window.
    w = prompt_windows(tok, " ".join(["a"] * 75 + [","] + ["a"]))
    assert [_body(r, tok) for r in w.ids] == [[a] * 75, [comma, a]]


def test_break_windows(tok):
    a, b = tok.encode("a")[0], tok.encode("b")[0]
    assert [_body(r, tok) for r in prompt_windows(tok, "a BREAK b").ids] == [[a], [b]]
    assert [_body(r, tok) for r in prompt_windows(tok, "BREAK a").ids] == [[], [a]]
    assert [_body(r, tok) for r in prompt_windows(tok, "a BREAK").ids] == [[a]]
    w = prompt_windows(tok, "(a) BREAK b")
    assert w.weights[0][:3] == (1.0, 1.1, 1.0) and set(w.weights[1]) == {1.0}


def test_weights_follow_their_tokens(tok):
    w = prompt_windows(tok, "a (red circle:1.3) [b]")
    ids = list(w.ids[0])
    assert ids[1:5] == tok.encode("a") + tok.encode("red circle") + tok.encode("b")
    assert w.weights[0][:6] == (1.0, 1.0, 1.3, 1.3, 1 / 1.1, 1.0)
    assert set(w.weights[0][6:]) == {1.0}


# --- encoding: parity with the math restated --------------------------------------------------

def _by_hand(te, rows):
    """Each 77-id window through CLIPTextModel alone, concatenated along the sequence axis."""
    return torch.cat([te(torch.tensor([row]))[0][0] for row in rows])


@torch.inference_mode()
def test_plain_prompts_are_bit_identical_to_the_single_window_encoding(tiny_components):
    c = tiny_components
    texts = ["a red circle", "", "a red circle", "two blue squares, 4k: photo"]
    old = c.text_encoder(c.tokenizer(list(dict.fromkeys(texts))))[0]
    index = torch.tensor([list(dict.fromkeys(texts)).index(t) for t in texts])
    assert torch.equal(encode_prompts(c.tokenizer, c.text_encoder, texts),
                       old.index_select(0, index))


@torch.inference_mode()
def test_long_prompt_and_padding_match_windows_encoded_by_hand(tiny_components):
    c = tiny_components
    long = ", ".join(["a red circle on the left"] * 40)        # 239 tokens
    windows = prompt_windows(c.tokenizer, long).ids
    assert len(windows) == 4
    out = encode_prompts(c.tokenizer, c.text_encoder, [long, "blue"])
    assert out.shape == (2, 4 * 77, c.text_encoder.config.hidden_size)
    empty = [c.tokenizer("")[0].tolist()]
    blue = [c.tokenizer("blue")[0].tolist()]
    # Batched vs one window at a time: the same float32 ops, but GEMM blocking may differ with
    # the batch size, so a few ulps of float32 (the states are O(1)).
    tol = {"atol": 1e-5, "rtol": 1e-5}
    torch.testing.assert_close(out[0], _by_hand(c.text_encoder, windows), **tol)
    torch.testing.assert_close(out[1], _by_hand(c.text_encoder, blue + empty * 3), **tol)


@torch.inference_mode()
def test_weights_scale_tokens_and_restore_the_window_mean(tiny_components):
    c = tiny_components
    prompt = "a (red:1.5) circle [left]"
    out = encode_prompts(c.tokenizer, c.text_encoder, [prompt])[0]
    row = [c.tokenizer.bos_id, *c.tokenizer.encode("a"), *c.tokenizer.encode("red"),
           *c.tokenizer.encode("circle"), *c.tokenizer.encode("left"), c.tokenizer.eos_id]
    row += [c.tokenizer.pad_id] * (77 - len(row))
    w = torch.ones(77)
    w[2], w[4] = 1.5, 1 / 1.1
    z = c.text_encoder(torch.tensor([row]))[0][0]                     # (77, D)
    expected = z * w[:, None]
    expected = expected * (z.mean() / expected.mean())
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert torch.allclose(out.mean(), z.mean(), atol=1e-6)
    assert not torch.allclose(out, z, atol=1e-3)                   # the weights did something
    # apply_weights itself, exactly: all-ones weights change nothing.
    assert torch.equal(apply_weights(z, torch.ones(77)), z * (z.mean() / z.mean()))


@torch.inference_mode()
def test_weight_one_is_plain_and_break_splits(tiny_components):
    c = tiny_components

    def enc(*texts):
        return encode_prompts(c.tokenizer, c.text_encoder, list(texts))

    assert torch.equal(enc("(a:1.0) red circle"), enc("a red circle"))
    broken = enc("a red BREAK circle")
    assert broken.shape[1] == 154
    torch.testing.assert_close(broken[0], torch.cat([enc("a red")[0], enc("circle")[0]]),
                               atol=1e-5, rtol=1e-5)


@torch.inference_mode()
def test_each_distinct_text_goes_through_the_encoder_once(tiny_components):
    c = tiny_components
    seen = []
    hook = c.text_encoder.register_forward_hook(lambda m, args, out: seen.append(args[0].shape))
    try:
        long = " ".join(["a"] * 100)
        out = encode_prompts(c.tokenizer, c.text_encoder, [long, "b", long, "b", ""])
    finally:
        hook.remove()
    assert seen == [torch.Size([3 * 2, 77])]          # 3 distinct texts, 2 windows each, one call
    assert torch.equal(out[0], out[2]) and torch.equal(out[1], out[3])


# --- CLIP skip -----------------------------------------------------------------------------

@torch.inference_mode()
def test_clip_skip_matches_diffusers_offset_by_one(tiny_components):
    c = tiny_components
    te = copy.deepcopy(c.text_encoder)
    # diffusers' encode_prompt reaches the final norm as text_encoder.text_model.final_layer_norm,
    # which transformers 5's CLIPTextModel no longer has (it holds final_layer_norm itself):
    # give this copy that alias so diffusers' own code path runs.
    object.__setattr__(te, "text_model", te)
    ref = StableDiffusionPipeline(vae=c.vae, text_encoder=te, tokenizer=c.tokenizer.hf,
                                  unet=c.unet, scheduler=DDIMScheduler(steps_offset=1,
                                                                       clip_sample=False),
                                  safety_checker=None, feature_extractor=None,
                                  requires_safety_checker=False)
    prompts = ["a red circle on the left", "blue"]
    for ours, theirs in ((1, None), (2, 1)):
        expected, _ = ref.encode_prompt(prompts, "cpu", 1, False, clip_skip=theirs)
        got = encode_prompts(c.tokenizer, c.text_encoder, prompts, clip_skip=ours)
        # The same modules on the same ids; exact.
        assert torch.equal(got, expected), (ours, theirs)
    assert not torch.allclose(encode_prompts(c.tokenizer, c.text_encoder, prompts, clip_skip=2),
                              encode_prompts(c.tokenizer, c.text_encoder, prompts), atol=1e-3)


@pytest.fixture(scope="module")
def pipe(tiny_dir):
    return TextToImage.from_folder(tiny_dir)


@pytest.mark.parametrize("bad", [0, -1, 3, 1.5, True, "2"])
def test_bad_clip_skip_is_refused_before_compute(pipe, bad):
    calls = []
    hook = pipe.components.text_encoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(UserInputError, match="clip skip"):
            pipe("x", num_inference_steps=1, clip_skip=bad, progress=False, seed=0)
    finally:
        hook.remove()
    assert calls == []


def test_long_weighted_prompt_generates_and_records_clip_skip(pipe, tmp_path):
    long = "(a red circle:1.2) on the left, " * 20 + "BREAK a blue square"
    seen = []
    unet = pipe.components.unet
    hook = unet.register_forward_pre_hook(
        lambda m, args, kw: seen.append(kw["encoder_hidden_states"].shape[1]), with_kwargs=True)
    try:
        result = pipe(long, negative_prompt="blurry", num_inference_steps=2, seed=3,
                      clip_skip=2, progress=False)
    finally:
        hook.remove()
    windows = len(prompt_windows(pipe.components.tokenizer, long).ids)
    assert windows == 3 and set(seen) == {77 * windows}
    params = result.params[0]
    assert params.clip_skip == 2 and params.prompt == long
    again = pipe.regenerate(parse_parameters(format_parameters(params)), progress=False)
    assert torch.equal(again.latents, result.latents)


# --- PNG metadata and the CLI --------------------------------------------------------------

def test_clip_skip_in_png_text_only_when_not_the_default():
    p = GenerationParams(prompt="x", steps=3, seed=1, height=8, width=8, eta=0.0)
    assert "Clip skip" not in format_parameters(p)
    text = format_parameters(p.replace(clip_skip=2))
    assert ", Clip skip: 2, " in text
    assert parse_parameters(text) == p.replace(clip_skip=2)
    with pytest.raises(UserInputError, match="Clip skip"):
        parse_parameters(text.replace("Clip skip: 2", "Clip skip: 0"))


def test_cli_clip_skip(tiny_dir, tmp_path, capsys):
    out, again = tmp_path / "a.png", tmp_path / "b.png"
    base = ["--model", str(tiny_dir), "--steps", "2", "--seed", "1", "--quiet"]
    assert main(["generate", "a (red:1.3) circle", "--clip-skip", "2", "--out", str(out),
                 *base]) == 0
    assert read_png_params(out).clip_skip == 2
    assert main(["generate", "--from-image", str(out), "--out", str(again), "--quiet",
                 "--model", str(tiny_dir)]) == 0
    assert read_png_params(again).clip_skip == 2
    capsys.readouterr()
    for bad in ("0", "3"):
        assert main(["generate", "x", "--clip-skip", bad, "--out", str(tmp_path / "c.png"),
                     *base]) == 2
        err = capsys.readouterr().err
        assert "clip skip" in err and len(err.strip().split("\n")) == 1
    assert main(["generate", "(x:1.2.3)", "--out", str(tmp_path / "c.png"), *base]) == 2
    assert "is not a number" in capsys.readouterr().err


# --- textual-inversion embeddings ----------------------------------------------------------

def _save_formats(tmp_path, v):
    """The same (n, D) vectors in A1111's .pt and .safetensors and diffusers' layouts."""
    from safetensors.torch import save_file
    paths = {"a1111_pt": tmp_path / "my-style.pt", "a1111_st": tmp_path / "my-style.safetensors",
             "diffusers_bin": tmp_path / "learned_embeds.bin",
             "diffusers_st": tmp_path / "learned_embeds.safetensors"}
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": v.clone()},
                "name": "my-style", "step": 500}, paths["a1111_pt"])
    save_file({"emb_params": v.clone()}, paths["a1111_st"])
    torch.save({"<my-style>": v.clone()}, paths["diffusers_bin"])
    save_file({"<my-style>": v.clone()}, paths["diffusers_st"])
    return paths


def test_embedding_files_in_every_layout(tmp_path):
    from pipelines.embeddings import load_embedding
    v = torch.randn(2, 32, generator=torch.Generator().manual_seed(0))
    paths = _save_formats(tmp_path, v)
    names = {k: load_embedding(p, dim=32).name for k, p in paths.items()}
    assert names == {"a1111_pt": "my-style", "a1111_st": "my-style",
                     "diffusers_bin": "<my-style>", "diffusers_st": "<my-style>"}
    for p in paths.values():
        e = load_embedding(p, name="tok", dim=32)
        assert e.name == "tok" and torch.equal(e.vectors, v)
    with pytest.raises(UserInputError, match="32 wide.*768"):
        load_embedding(paths["a1111_pt"], dim=768)


def test_a_hostile_embedding_pickle_is_refused_unrun(tmp_path):
    from pipelines.embeddings import load_embedding
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            import os
            return os.system, (f"touch {marker}",)

    path = tmp_path / "evil.pt"
    torch.save({"string_to_param": {"*": Evil()}}, path)
    with pytest.raises(UserInputError, match="evil.pt"):
        load_embedding(path)
    assert not marker.exists()


@torch.inference_mode()
def test_embedding_parity_with_diffusers_load_textual_inversion(tiny_components, pipe):
    c = tiny_components
    v = torch.randn(3, 32, generator=torch.Generator().manual_seed(1))
    te, hf = copy.deepcopy(c.text_encoder), copy.deepcopy(c.tokenizer.hf)
    ref = StableDiffusionPipeline(vae=c.vae, text_encoder=te, tokenizer=hf, unet=c.unet,
                                  scheduler=DDIMScheduler(steps_offset=1, clip_sample=False),
                                  safety_checker=None, feature_extractor=None,
                                  requires_safety_checker=False)
    ref.load_textual_inversion({"<cat-toy>": v.clone()}, token="<cat-toy>")
    prompts = ["a photo of <cat-toy> on a red circle", "plain words"]
    expected, _ = ref.encode_prompt(prompts, "cpu", 1, False)
    from pipelines.embeddings import Embedding
    ours = pipe.with_embeddings(Embedding("<cat-toy>", v))
    got = ours.encode_text(prompts)
    # Same ids but for the placeholders, same vectors in the same positions: exact.
    assert torch.equal(got, expected)
    # The original pipeline is unchanged, and reads the name as plain words.
    assert not hasattr(pipe, "embeddings") or pipe.embeddings == ()
    assert not torch.allclose(pipe.encode_text(prompts)[0], got[0], atol=1e-3)


@torch.inference_mode()
def test_embedding_windows_weights_and_concurrency(pipe, tmp_path):
    import threading
    from pipelines.embeddings import Embedding
    tok = pipe.components.tokenizer
    e = Embedding("mystyle", torch.randn(4, 32, generator=torch.Generator().manual_seed(2)))
    # An embedding that does not fit in what is left of a window starts the next one.
    w = prompt_windows(tok, " ".join(["a"] * 73) + " MyStyle", [e])
    assert [len(_body(r, tok)) for r in w.ids] == [73, 4]
    assert w.fixes == ((), ((1, e),))
    w = prompt_windows(tok, "a (mystyle:1.5) b", [e])
    assert w.weights[0][:7] == (1.0, 1.0, 1.5, 1.5, 1.5, 1.5, 1.0) and w.fixes == (((2, e),),)
    # Concurrent encodings with and without the embedding equal the same ones run alone.
    styled = pipe.with_embeddings(e)
    jobs = [(styled if j % 2 else pipe, f"a mystyle picture {j % 3}") for j in range(8)]
    alone = [p.encode_text([t]) for p, t in jobs]
    results = [None] * len(jobs)

    def run(j):
        with torch.inference_mode():
            results[j] = jobs[j][0].encode_text([jobs[j][1]])
    threads = [threading.Thread(target=run, args=(j,)) for j in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(r, a) for r, a in zip(results, alone))
    assert not torch.equal(alone[0], alone[3])          # pipe vs styled, same text


def test_cli_embedding(tiny_dir, tmp_path, capsys):
    v = torch.randn(2, 32, generator=torch.Generator().manual_seed(3))
    paths = _save_formats(tmp_path, v)
    out = tmp_path / "e.png"
    base = ["--model", str(tiny_dir), "--steps", "1", "--seed", "1", "--quiet", "--out", str(out)]
    assert main(["generate", "a my-style circle", "--embedding", str(paths["a1111_pt"]),
                 *base]) == 0
    wide = tmp_path / "wide.safetensors"
    from safetensors.torch import save_file
    save_file({"emb_params": torch.zeros(1, 768)}, wide)
    capsys.readouterr()
    assert main(["generate", "x", "--embedding", str(wide), *base]) == 2
    assert "768 wide" in capsys.readouterr().err


def test_an_embedding_after_the_last_comma_moves_with_its_words(tok):
    from pipelines.embeddings import Embedding
    e = Embedding("mystyle", torch.zeros(2, 32))
    # 65 tokens, a comma, "b mystyle" (3 positions), then 7 more "a": full at 75 with the comma
    # 9 from the end, so "b mystyle a a a a a a" moves on and the embedding's offset with it.
    w = prompt_windows(tok, " ".join(["a"] * 65 + [",", "b", "mystyle"] + ["a"] * 7), [e])
    b = tok.encode("b")[0]
    assert [len(_body(r, tok)) for r in w.ids] == [66, 3 + 7]
    assert w.fixes == ((), ((2, e),)) and _body(w.ids[1], tok)[:3] == [b, 0, 0]
