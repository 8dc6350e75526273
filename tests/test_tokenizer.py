"""SDTokenizer against OpenAI CLIP's SimpleTokenizer, the reference CLIP tokenizer.

The reference is OpenAI's own ``clip/simple_tokenizer.py`` (PyPI: openai-clip, the package our
vocabulary file comes from), executed on its own: the package ``__init__`` imports torchvision.
``clip.tokenize`` (in the module that ``__init__`` imports) frames and zero-pads the ids;
``_Reference`` re-states those few lines. open_clip's tokenizer is a copy of both, up to the
special-token names.
"""

import gzip
import hashlib
import importlib.util
import json
import shutil
import unicodedata
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from diffusers import UNet2DConditionModel
from transformers import CLIPTokenizer

from ldm_engine import tokenizer as tokenizer_module
from ldm_engine import vocab as vocab_module
from ldm_engine.apps.cli import main as cli_main
from ldm_engine.components import load_model
from ldm_engine.errors import ModelFolderError
from ldm_engine.tokenizer import (
    BOS_ID,
    EOS_ID,
    MAX_LENGTH,
    VOCAB_SIZE,
    PromptTruncatedWarning,
    SDTokenizer,
    VocabularyFileError,
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
    spec = importlib.util.find_spec("clip")
    path = Path(next(iter(spec.submodule_search_locations))) / "simple_tokenizer.py"
    module_spec = importlib.util.spec_from_file_location("_openai_clip_tokenizer_reference", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


class _Reference:
    """OpenAI's SimpleTokenizer, plus ``clip.tokenize(texts, truncate=True)`` as rows."""

    def __init__(self):
        self.tokenizer = _load_reference_module().SimpleTokenizer()
        self.encoder = self.tokenizer.encoder
        self.encode = self.tokenizer.encode

    def __call__(self, prompts):
        prompts = [prompts] if isinstance(prompts, str) else prompts
        rows = torch.zeros(len(prompts), MAX_LENGTH, dtype=torch.long)
        for i, prompt in enumerate(prompts):
            ids = [BOS_ID, *self.encode(prompt), EOS_ID]
            if len(ids) > MAX_LENGTH:  # cut the framed row, then EOS over its last id
                ids = ids[:MAX_LENGTH]
                ids[-1] = EOS_ID
            rows[i, : len(ids)] = torch.tensor(ids)
        return rows


@pytest.fixture(scope="module")
def ref():
    return _Reference()


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
def test_eos_padding_matches_openai_up_to_eos(prompt, sd1, ref):
    expected = ref(prompt)[0]  # (77,), zero-padded
    eos_at = int((expected == EOS_ID).nonzero()[0])
    ours = _quiet(sd1, prompt)[0]
    assert ours[: eos_at + 1].tolist() == expected[: eos_at + 1].tolist()
    assert (ours[eos_at + 1 :] == EOS_ID).all()


@pytest.mark.parametrize("prompt", PROMPTS, ids=range(len(PROMPTS)))
def test_zero_padding_matches_openai_rows(prompt, sd2, ref):
    assert _quiet(sd2, prompt)[0].tolist() == ref(prompt)[0].tolist()


def test_batch_shape_dtype_and_rows(sd1, sd2, ref):
    ours = _quiet(sd2, PROMPTS)
    assert ours.shape == (len(PROMPTS), MAX_LENGTH) and ours.dtype == torch.int64
    assert torch.equal(ours, ref(PROMPTS))
    assert _quiet(sd1, PROMPTS).shape == (len(PROMPTS), MAX_LENGTH)
    assert sd1("a cat").shape == (1, MAX_LENGTH)
    assert sd1([]).shape == (0, MAX_LENGTH)


def test_sampled_code_points_match_openai(sd2, ref):
    # Every 13th assigned code point, alone and inside a word; the full sweep (~145k) also passes.
    assigned = (c for c in range(0x110000) if not 0xD800 <= c < 0xE000)
    points = [c for c in assigned if unicodedata.category(chr(c)) not in ("Cn", "Co")][::13]
    prompts = [f"{chr(c)} a{chr(c)}b {chr(c)}{chr(c)}" for c in points]
    assert torch.equal(_quiet(sd2, prompts), ref(prompts))


def test_vocab_is_openais(sd1, ref):
    assert sd1.hf.get_vocab() == ref.encoder
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
    assert sd1.encode("a <|endoftext|> b") == ref.encode("a <|endoftext|> b") == [320, EOS_ID, 321]
    assert sd1.encode("<|startoftext|>") == ref.encode("<|startoftext|>") == [BOS_ID]
    assert EOS_ID not in sd1.encode("<end_of_text>")
    assert sd1.encode("<end_of_text>") == ref.encode("<end_of_text>")


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


# --- where the vocabulary comes from (one file, checked by SHA-256) ----------------------------


def _fake_package(root: Path, name: str, content: bytes | None) -> Path:
    """A package on sys.path holding ``content`` as its BPE file (None: no file)."""
    (root / name).mkdir()
    (root / name / "__init__.py").write_text("raise ImportError('never imported')\n")
    if content is not None:
        (root / name / vocab_module.BPE_FILE).write_bytes(content)
    return root / name / vocab_module.BPE_FILE


@pytest.fixture()
def bpe_bytes():
    return vocab_module.bpe_vocab_path().read_bytes()


def test_installed_bpe_file_is_openais():
    path = vocab_module.bpe_vocab_path()
    assert path.parent.name == "clip"  # openai-clip, the package setup.cfg installs
    assert hashlib.sha256(path.read_bytes()).hexdigest() == vocab_module.BPE_SHA256


def test_missing_vocabulary_package_says_what_to_install(monkeypatch, tmp_path):
    _fake_package(tmp_path, "ldm_fake_vocab_empty", None)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(vocab_module, "BPE_PACKAGES", ("ldm_no_such_package", "ldm_fake_vocab_empty"))
    with pytest.raises(VocabularyFileError, match="bpe_simple_vocab_16e6.txt.gz was not found.*"
                       "pip install openai-clip") as caught:
        SDTokenizer.from_bpe()
    assert isinstance(caught.value, FileNotFoundError) and "\n" not in str(caught.value)


def test_file_found_in_a_later_package_is_used(monkeypatch, tmp_path, bpe_bytes):
    path = _fake_package(tmp_path, "ldm_fake_vocab_ok", bpe_bytes)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(vocab_module, "BPE_PACKAGES", ("ldm_no_such_package", "ldm_fake_vocab_ok"))
    assert vocab_module.bpe_vocab_path() == path
    assert SDTokenizer.from_bpe()("a cat")[0, :4].tolist() == [BOS_ID, 320, 2368, EOS_ID]


def _other_merges(bpe_bytes: bytes) -> bytes:
    """The same merge list with two ranks swapped: every size right, some prompts' ids not."""
    lines = gzip.decompress(bpe_bytes).decode("utf-8").split("\n")
    lines[1], lines[2] = lines[2], lines[1]
    return gzip.compress("\n".join(lines).encode("utf-8"))


def test_a_different_bpe_file_is_refused(monkeypatch, tmp_path, bpe_bytes):
    # Another package that happens to be called `clip`, or a damaged install: never used.
    wrong = _fake_package(tmp_path, "ldm_fake_vocab_wrong", _other_merges(bpe_bytes))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(vocab_module, "BPE_PACKAGES", ("ldm_fake_vocab_wrong",))
    with pytest.raises(VocabularyFileError, match="is not OpenAI CLIP's .*SHA-256"):
        SDTokenizer.from_bpe()
    with pytest.raises(VocabularyFileError, match="SHA-256"):
        vocab_module.clip_vocab(str(wrong))  # the check is on the bytes that are parsed
    # A good copy further down the search order wins over the bad one.
    good = _fake_package(tmp_path, "ldm_fake_vocab_good", bpe_bytes)
    monkeypatch.setattr(vocab_module, "BPE_PACKAGES", ("ldm_fake_vocab_wrong", "ldm_fake_vocab_good"))
    assert vocab_module.bpe_vocab_path() == good


# --- tokenizer folders: both layouts, CLIP's tables only, one-line errors ------------------------


@pytest.mark.parametrize("pad", ["eos", "zero"])
def test_folder_saved_by_transformers_loads(pad, tmp_path):
    """transformers 5's save_pretrained writes tokenizer.json + tokenizer_config.json only."""
    ours = SDTokenizer.from_bpe(pad)
    ours.hf.save_pretrained(tmp_path)
    if int(transformers.__version__.split(".")[0]) >= 5:
        assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    again = SDTokenizer.from_folder(tmp_path)
    assert (again.pad_id, again.max_length) == (ours.pad_id, MAX_LENGTH)
    assert again.pad_id == (EOS_ID if pad == "eos" else 0)
    assert torch.equal(_quiet(again, PROMPTS), _quiet(ours, PROMPTS))


def test_tokenizer_json_with_string_merges_and_all_files(tmp_path, sd1):
    """A fast tokenizer saved by transformers 4: every file, merges spelled "a b"."""
    sd1.save(tmp_path)
    sd1.hf.save_pretrained(tmp_path / "new")
    data = json.loads((tmp_path / "new/tokenizer.json").read_text(encoding="utf-8"))
    data["model"]["merges"] = [" ".join(m) for m in data["model"]["merges"]]
    (tmp_path / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    assert torch.equal(_quiet(SDTokenizer.from_folder(tmp_path), PROMPTS), _quiet(sd1, PROMPTS))


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    edit(data)
    path.write_text(json.dumps(data), encoding="utf-8")


def _swap(table: dict, a: str, b: str) -> None:
    table[a], table[b] = table[b], table[a]


def _swap_merges(model: dict) -> None:
    model["merges"][0], model["merges"][1] = model["merges"][1], model["merges"][0]


@pytest.mark.parametrize("layout", ["tokenizer.json", "vocab.json"])
@pytest.mark.parametrize("change,message", [
    (lambda model: _swap(model["vocab"], "cat</w>", "dog</w>"), "not CLIP's vocabulary.*'cat</w>'"),
    (lambda model: model["vocab"].update({"<cat-toy>": 49408}), "49409 tokens, CLIP has 49408"),
    (_swap_merges, "not CLIP's merge list .merge 0"),
    (lambda model: model["merges"].pop(), "48893 merges, CLIP has 48894"),
])
def test_a_different_vocabulary_is_refused(layout, change, message, sd1, tmp_path):
    if layout == "tokenizer.json":
        sd1.hf.save_pretrained(tmp_path)
        _edit_json(tmp_path / "tokenizer.json", lambda data: change(data["model"]))
    else:
        sd1.save(tmp_path)
        vocab = json.loads((tmp_path / "vocab.json").read_text(encoding="utf-8"))
        lines = (tmp_path / "merges.txt").read_text(encoding="utf-8").split("\n")
        model = {"vocab": vocab, "merges": [line.split(" ") for line in lines[1:] if line]}
        change(model)
        (tmp_path / "vocab.json").write_text(json.dumps(model["vocab"]), encoding="utf-8")
        merges = "\n".join(["#version: 0.2", *(" ".join(m) for m in model["merges"])]) + "\n"
        (tmp_path / "merges.txt").write_text(merges, encoding="utf-8")
    with pytest.raises(ModelFolderError, match=message) as caught:
        SDTokenizer.from_folder(tmp_path)
    assert "\n" not in str(caught.value)


ADDED = {"id": 49408, "content": "<cat-toy>", "special": False}


@pytest.mark.parametrize("file,edit,message", [
    ("tokenizer_config.json special_tokens_map.json", lambda c: c.update(pad_token="<|startoftext|>"),
     "pads with '<|startoftext|>'"),
    ("tokenizer_config.json", lambda c: c.update(bos_token="<s>"), "bos_token is '<s>'"),
    ("tokenizer_config.json", lambda c: c.update(pad_token={"content": "!"}), "different pad tokens"),
    ("tokenizer_config.json", lambda c: c.update(model_max_length="77"), "model_max_length"),
    ("tokenizer_config.json", lambda c: c.update(model_max_length=1), "model_max_length"),
    ("special_tokens_map.json", lambda c: c.update(pad_token=5), "must be a token string"),
    ("tokenizer.json", lambda t: t.update(padding={"pad_token": "!", "pad_id": 5}), "pad_id 5"),
    ("tokenizer.json", lambda t: t.update(padding={"pad_token": "!", "pad_id": 0}), "different pad"),
    ("tokenizer.json", lambda t: t["added_tokens"].append(ADDED), "'<cat-toy>' .id 49408"),
    ("tokenizer.json", lambda t: t.update(added_tokens={"a": 1}), "added_tokens must be a list"),
    ("tokenizer.json", lambda t: t.update(model=[]), "does not hold a BPE model"),
    ("tokenizer.json", lambda t: t["model"].update(vocab=[1]), "must map tokens to integer ids"),
    ("tokenizer.json", lambda t: t["model"].update(merges=[["a", "b", "c"]]), "merge 0 is"),
])
def test_bad_special_tokens_padding_and_added_tokens(file, edit, message, sd1, tmp_path):
    sd1.save(tmp_path)  # all five files, each naming the EOS pad
    sd1.hf.save_pretrained(tmp_path / "new")
    shutil.copy(tmp_path / "new/tokenizer.json", tmp_path)
    for name in file.split():
        _edit_json(tmp_path / name, edit)
    with pytest.raises(ModelFolderError, match=message) as caught:
        SDTokenizer.from_folder(tmp_path)
    assert "\n" not in str(caught.value)


def test_unset_model_max_length_means_77(sd1, tmp_path):
    sd1.save(tmp_path)
    _edit_json(tmp_path / "tokenizer_config.json", lambda c: c.update(model_max_length=int(1e30)))
    assert SDTokenizer.from_folder(tmp_path).max_length == MAX_LENGTH
    _edit_json(tmp_path / "tokenizer_config.json", lambda c: c.pop("model_max_length"))
    assert SDTokenizer.from_folder(tmp_path).max_length == MAX_LENGTH


@pytest.mark.parametrize("file,content,message", [
    ("vocab.json", b"{", "vocab.json is not valid JSON"),
    ("vocab.json", b"[1, 2]", "must hold a JSON object, not list"),
    ("vocab.json", b'{"a": "x"}', "must map tokens to integer ids"),
    ("vocab.json", b'{"a": true}', "must map tokens to integer ids"),
    ("vocab.json", b"\xff\xfe{}", "vocab.json is not UTF-8"),
    ("vocab.json", b"[" * 100000, "not valid JSON"),
    ("merges.txt", b"#version: 0.2\n\xc3(\n", "merges.txt is not UTF-8"),
    ("merges.txt", b"#version: 0.2\na b c\n", "merge 0 is 'a b c'"),
    ("tokenizer_config.json", b"{", "tokenizer_config.json is not valid JSON"),
    ("tokenizer_config.json", b"\x80", "tokenizer_config.json is not UTF-8"),
    ("special_tokens_map.json", b"null", "must hold a JSON object"),
    ("tokenizer.json", b"{", "tokenizer.json is not valid JSON"),
    ("added_tokens.json", b'{"<cat-toy>": 49408}', "not CLIP's: '<cat-toy>'"),
])
def test_broken_tokenizer_files_are_one_line_errors(file, content, message, sd1, tmp_path):
    sd1.save(tmp_path)
    (tmp_path / file).write_bytes(content)
    with pytest.raises(ModelFolderError, match=message) as caught:
        SDTokenizer.from_folder(tmp_path)
    assert "\n" not in str(caught.value)


def test_missing_tables_are_named(sd1, tmp_path):
    sd1.save(tmp_path)
    (tmp_path / "merges.txt").unlink()
    with pytest.raises(ModelFolderError, match="has vocab.json but no merges.txt"):
        SDTokenizer.from_folder(tmp_path)
    (tmp_path / "vocab.json").unlink()
    with pytest.raises(ModelFolderError, match="neither tokenizer.json nor vocab.json"):
        SDTokenizer.from_folder(tmp_path)
    with pytest.raises(ModelFolderError, match="not found"):
        SDTokenizer.from_folder(tmp_path / "absent")


def test_broken_tokenizer_in_a_model_folder_fails_before_compute(tiny_dir, tmp_path, capsys,
                                                                 monkeypatch):
    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    (model / "tokenizer/vocab.json").write_text("{", encoding="utf-8")
    with pytest.raises(ModelFolderError, match="vocab.json is not valid JSON"):
        load_model(model)
    # The CLI: exit status 2, one line, and the UNet never runs.
    monkeypatch.setattr(UNet2DConditionModel, "forward", _never_called)
    out = tmp_path / "out.png"
    assert cli_main(["generate", "a cat", "--model", str(model), "--steps", "2", "--out",
                     str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "vocab.json is not valid JSON" in err and not out.exists()


def _never_called(*args, **kwargs):
    raise AssertionError("the UNet ran")
