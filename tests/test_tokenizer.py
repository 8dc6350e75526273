"""SDTokenizer against open_clip's SimpleTokenizer, the reference CLIP tokenizer.

open_clip's package __init__ imports torchvision (absent with CPU-only torch), so the reference is
loaded by executing only its tokenizer.py, which needs just ftfy, regex, numpy and torch.
"""

import importlib.util
import unicodedata
import warnings
from pathlib import Path

import pytest
import torch
from transformers import CLIPTokenizer

from ldm_engine import tokenizer as tokenizer_module
from ldm_engine.tokenizer import (
    BOS_ID,
    EOS_ID,
    MAX_LENGTH,
    VOCAB_SIZE,
    PromptTruncatedWarning,
    SDTokenizer,
    clean_prompt,
)

LONG_CAPTION = (
    "a highly detailed matte painting of a sprawling cyberpunk city at night, neon signs reflected in "
    "rain-soaked streets, flying cars, towering skyscrapers with holographic billboards, crowds of "
    "people with umbrellas, steam rising from manholes, cinematic lighting, volumetric fog, octane "
    "render, unreal engine 5, trending on artstation, by greg rutkowski and syd mead, 8k, ultra wide "
    "angle, dramatic composition, vibrant colors, sharp focus, intricate details, masterpiece"
)

PROMPTS = [
    "",
    "a photo of a cat",
    "A Photo Of A CAT",
    "AN ASTRONAUT RIDING A HORSE ON MARS",
    "a painting of a fox sitting in a field at sunrise in the style of Claude Monet",
    "portrait of a woman, oil on canvas, rembrandt lighting",
    "What?!... really?!?! yes!!!",
    "wow!!!",
    "hello!?",
    "!",
    "!!!!!!!!!!!!!!!!",
    "--- *** ~~~ ### @@@ $$$ %%% ^^^",
    "1234567890",
    "1,000,000 dollars in 2024 (approx. 3.14e6 yen)",
    "4k 8k uhd 1080p 35mm f/1.8",
    "don't can't won't I'm you're we've they'll she'd it's",
    "DON'T STOP ME NOW, IT'S JOHN'S",
    "rock 'n' roll ''quoted'' 'single'",
    "café crème brûlée à la française",
    "Straße in München, Ærøskøbing, Łódź, İstanbul",
    "ΟΔΟΣ ΣΟΦΙΑΣ, Ἀθῆναι",
    "Москва зимой, на красной площади",
    "富士山と桜、日本の風景",
    "一只可爱的猫坐在窗台上",
    "한국어 프롬프트 테스트",
    "मुंबई की सड़कें, العربية",
    "a dog 🐶 and a cat 🐱 🎉🎉🎉",
    "👨‍👩‍👧‍👦 family, 👍🏽 thumbs, 🇫🇷🇯🇵 flags, 🏳️‍🌈",
    "Tom &amp; Jerry",
    "&amp;amp; &lt;b&gt;bold&lt;/b&gt; &quot;quoted&quot; &#39;apos&#39; &#x263A;",
    "<b>bold</b> &amp; <i>italic</i>",
    "<lora:detail:0.8> cafe&#769; (non-NFC after unescape)",
    "cafÃ© mojibake and â€œsmart quotesâ€\x9d",
    "“curly quotes” and ‘single’ — em dash … ellipsis",
    "ﬁne ligatures ﬀ ﬂ and ＦＵＬＬＷＩＤＴＨ ｔｅｘｔ and ﾊﾝｶｸ ｶﾞ",
    "x² y³ ½ ⅓ Ⅻ roman ① circled",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\r\nand\u00a0nbsp\u2003em\u3000ideographic",
    "\t\n  \n\t",
    "zero\u200bwidth and soft\u00adhyphen",
    "bell\x07 escape \x1b[31mred\x1b[0m \x0c formfeed",
    "combining e\u0301 vs é and \u0345 ypogegrammeni Ⓐⓑ",
    "(red:1.2), [blue], {green}, ((masterpiece)), (worst quality:1.4)",
    "a (photo:1.3) of [cat|dog] AND a [[tree]] <lora:foo:0.7> BREAK sky",
    "masterpiece, best quality, 1girl, solo, long_hair, looking_at_viewer",
    "C++ and C# code on a screen, user@example.com, https://example.com/a?b=c&d=e",
    "$100 #hashtag @mention 50% off *bold* _under_ `code`",
    "ǅ titlecase ǈ Ǆ and K kelvin sign",
    "photo" * 40,
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    LONG_CAPTION,
    "a " * 74 + "b",
    "a " * 75 + "zebra giraffe",
    "🐶" * 60,
    "富士山" * 50,
]


def _load_reference_module():
    spec = importlib.util.find_spec("open_clip")
    path = Path(next(iter(spec.submodule_search_locations))) / "tokenizer.py"
    module_spec = importlib.util.spec_from_file_location("_open_clip_tokenizer_reference", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def ref():
    return _load_reference_module().SimpleTokenizer()


@pytest.fixture(scope="module")
def sd1():
    return SDTokenizer.from_bpe("eos")


@pytest.fixture(scope="module")
def sd2():
    return SDTokenizer.from_bpe("zero")


def _quiet(tok, prompts):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PromptTruncatedWarning)
        return tok(prompts)


def test_enough_varied_prompts():
    assert len(PROMPTS) >= 50
    assert any(len(p) > 300 for p in PROMPTS)


@pytest.mark.parametrize("prompt", PROMPTS, ids=range(len(PROMPTS)))
def test_eos_padding_matches_open_clip_up_to_eos(prompt, sd1, ref):
    expected = ref(prompt)[0]  # (77,), zero-padded
    eos_at = int((expected == EOS_ID).nonzero()[0])
    ours = _quiet(sd1, prompt)[0]
    assert ours[: eos_at + 1].tolist() == expected[: eos_at + 1].tolist()
    assert (ours[eos_at + 1 :] == EOS_ID).all()


@pytest.mark.parametrize("prompt", PROMPTS, ids=range(len(PROMPTS)))
def test_zero_padding_matches_open_clip_rows(prompt, sd2, ref):
    assert _quiet(sd2, prompt)[0].tolist() == ref(prompt)[0].tolist()


def test_batch_shape_dtype_and_rows(sd1, sd2, ref):
    ours = _quiet(sd2, PROMPTS)
    assert ours.shape == (len(PROMPTS), MAX_LENGTH) and ours.dtype == torch.int64
    assert torch.equal(ours, ref(PROMPTS))
    assert _quiet(sd1, PROMPTS).shape == (len(PROMPTS), MAX_LENGTH)
    assert sd1("a cat").shape == (1, MAX_LENGTH)
    assert sd1([]).shape == (0, MAX_LENGTH)


def test_sampled_code_points_match_open_clip(sd2, ref):
    # Every 13th assigned code point, alone and inside a word; the full sweep (~145k) also passes.
    assigned = (c for c in range(0x110000) if not 0xD800 <= c < 0xE000)
    points = [c for c in assigned if unicodedata.category(chr(c)) not in ("Cn", "Co")][::13]
    prompts = [f"{chr(c)} a{chr(c)}b {chr(c)}{chr(c)}" for c in points]
    assert torch.equal(_quiet(sd2, prompts), ref(prompts))


def test_vocab_is_open_clips(sd1, ref):
    renamed = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    expected = {renamed.get(token, token): i for token, i in ref.encoder.items()}
    assert sd1.hf.get_vocab() == expected
    assert len(sd1.hf) == VOCAB_SIZE == 49408


def test_special_and_pad_ids(sd1, sd2):
    for tok in (sd1, sd2):
        assert (tok.bos_id, tok.eos_id) == (BOS_ID, EOS_ID) == (49406, 49407)
        assert tok.hf.convert_tokens_to_ids(["<|startoftext|>", "<|endoftext|>"]) == [49406, 49407]
        assert tok.max_length == tok.hf.model_max_length == MAX_LENGTH == 77
    assert sd1.pad_id == EOS_ID and sd2.pad_id == 0 and sd2.hf.convert_ids_to_tokens(0) == "!"
    assert sd1("a cat")[0].tolist() == [BOS_ID, 320, 2368] + [EOS_ID] * 74
    assert sd2("a cat")[0].tolist() == [BOS_ID, 320, 2368, EOS_ID] + [0] * 73
    assert sd1("")[0, :2].tolist() == [BOS_ID, EOS_ID]


def test_special_token_literals_follow_openai_clip(sd1, ref):
    # OpenAI CLIP / HF / SD-1.x read "<|endoftext|>" as EOS; open_clip renamed it "<end_of_text>".
    assert sd1.encode("a <|endoftext|> b") == [320, EOS_ID, 321]
    assert sd1.encode("<|startoftext|>") == [BOS_ID]
    assert ref.encode("<end_of_text>") == [EOS_ID]
    assert EOS_ID not in sd1.encode("<end_of_text>")


def test_clean_prompt_normalises_like_open_clip():
    assert clean_prompt("  Tom &amp; Jerry\t\n") == "tom & jerry"
    assert clean_prompt("cafÃ© ﬁne ＦＵＬＬ") == "café fine full"
    assert clean_prompt("ΟΔΟΣ") == "οδος"
    assert clean_prompt("it's (red:1.2)") == "it 's ( red : 1 . 2 )"


def test_truncation_warns_with_dropped_text(sd1, sd2, ref):
    prompt = "a " * 75 + "zebra giraffe"
    expected = r"prompt truncated to 77 CLIP tokens; dropped: 'zebra giraffe'"
    with pytest.warns(PromptTruncatedWarning, match=expected):
        row = sd1(prompt)[0]
    assert row.tolist() == [BOS_ID] + [320] * 75 + [EOS_ID]
    with pytest.warns(PromptTruncatedWarning, match="dropped"):
        assert sd2(prompt)[0].tolist() == ref(prompt)[0].tolist()


def test_no_warning_at_exactly_77_tokens(sd1):
    prompt = "a " * 75
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        row = sd1(prompt)[0]
    assert row[-1] == EOS_ID and (row[1:-1] == 320).all()


def test_decode(sd1, sd2):
    assert sd1.decode(sd1("A photo of a CAT!")[0]) == "a photo of a cat !"
    assert sd2.decode(sd2("wow!!! hi!")[0]) == "wow !!! hi !"
    assert sd1.decode([320, 2368]) == "a cat"
    assert sd1.decode(sd1("")[0]) == ""
    injected = sd1("a <|endoftext|> b")[0]
    assert sd1(sd1.decode(injected))[0].tolist() == injected.tolist()
    assert sd2.decode(sd2("富士山 🐶")[0]) == "富士山 🐶"
    with pytest.raises(ValueError, match="one row"):
        sd1.decode(sd1(["a", "b"]))
    with pytest.raises(ValueError, match="one row"):
        sd1.decode([[320], [321]])


def test_bad_arguments(sd1):
    with pytest.raises(ValueError, match="pad must be one of"):
        SDTokenizer.from_bpe("left")
    with pytest.raises(TypeError, match="strings"):
        sd1(["a cat", 3])


@pytest.mark.parametrize("pad", ["eos", "zero"])
def test_saved_folder_loads_in_transformers_with_same_ids(pad, tmp_path):
    ours = SDTokenizer.from_bpe(pad)
    ours.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(tokenizer_module._FOLDER_FILES)
    assert (tmp_path / "merges.txt").read_text(encoding="utf-8").startswith("#version: 0.2\n")
    loaded = CLIPTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    # Text the HF tokenizer sees as open_clip does (already clean, no "!" that SD-2's pad token
    # would split out): diffusers' call must give our rows, padding included.
    plain = [p for p in PROMPTS if clean_prompt(p) == " ".join(p.lower().split()) and "!" not in p]
    assert len(plain) >= 15
    # The call diffusers' pipelines make.
    hf_ids = loaded(
        plain, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt"
    ).input_ids
    assert torch.equal(hf_ids, _quiet(ours, plain))

    again = SDTokenizer.from_folder(tmp_path)
    assert (again.pad_id, again.max_length) == (ours.pad_id, MAX_LENGTH)
    assert torch.equal(_quiet(again, PROMPTS), _quiet(ours, PROMPTS))


def test_from_folder_names_missing_file(sd1, tmp_path):
    sd1.save(tmp_path)
    (tmp_path / "merges.txt").unlink()
    with pytest.raises(FileNotFoundError, match="merges.txt"):
        SDTokenizer.from_folder(tmp_path)


def test_missing_open_clip_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(tokenizer_module, "_BPE_PACKAGE", "ldm_engine_no_such_package")
    with pytest.raises(FileNotFoundError, match="bpe_simple_vocab_16e6.txt.gz.*open_clip_torch"):
        SDTokenizer.from_bpe()


def test_missing_bpe_file_is_a_clear_error(monkeypatch, tmp_path):
    (tmp_path / "fake_open_clip").mkdir()
    (tmp_path / "fake_open_clip" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(tokenizer_module, "_BPE_PACKAGE", "fake_open_clip")
    with pytest.raises(FileNotFoundError, match="bpe_simple_vocab_16e6.txt.gz was not found"):
        SDTokenizer.from_bpe()
