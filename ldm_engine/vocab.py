"""CLIP's BPE vocabulary: the one file it is built from, and checking a tokenizer folder holds it.

SD-1.x and SD-2.x both tokenize with OpenAI CLIP's byte-level BPE (Radford et al. 2021). OpenAI
published its merge list as ``bpe_simple_vocab_16e6.txt.gz``; the 49,408-id vocabulary follows
from it (layout in ``clip_vocab``). Nothing is fetched from a model hub: the file comes from an
installed Python package and is used only if its SHA-256 is OpenAI's, so a different or damaged
file (another package that happens to be called ``clip``, a truncated install) is refused rather
than silently giving other ids.

A diffusers ``tokenizer/`` folder repeats the tables, in one of two layouts: ``vocab.json`` +
``merges.txt`` (what SD checkpoints publish and ``SDTokenizer.save`` writes) or ``tokenizer.json``
(what transformers 5 writes, with ``tokenizer_config.json`` beside it). ``read_tokenizer_folder``
checks that every table the folder has is CLIP's, and returns the two things a folder decides:
the padding id and the row length.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

from .errors import ModelFolderError

MAX_LENGTH = 77  # CLIP's text tower has 77 learned positions: BOS + 75 tokens + EOS.
VOCAB_SIZE = 49408  # 512 byte symbols + 48,894 merges + 2 specials.
BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
BOS_ID = 49406
EOS_ID = 49407

PadMode = Literal["eos", "zero"]
# What fills a row after EOS. SD-1.x (openai/clip-vit-large-patch14's tokenizer) pads with EOS;
# SD-2.x (open_clip ViT-H/14, trained with open_clip's zero padding) pads with id 0, the byte
# symbol "!". The text encoders were trained with these paddings, so the choice changes outputs.
PAD_TOKENS: dict[str, str] = {"eos": EOS, "zero": "!"}

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
# SHA-256 of OpenAI's file as released with CLIP; openai-clip and open_clip_torch ship it byte for
# byte. Pinning the bytes pins every id, merge rank and so every prompt's tokens.
BPE_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
# Packages that ship the file, in search order: OpenAI's own ``clip`` (PyPI: openai-clip, which
# needs only ftfy, regex and tqdm), then ``open_clip`` (open_clip_torch) for environments that
# already have it. Neither is imported: both package ``__init__``s import torchvision, which is
# absent (or built for another torch) next to a CPU-only torch.
BPE_PACKAGES: tuple[str, ...] = ("clip", "open_clip")
INSTALL_HINT = "pip install openai-clip (it ships the file and needs only ftfy, regex and tqdm)"
_NUM_MERGES = VOCAB_SIZE - 2 * 256 - 2  # 48,894: the rest of the file was never used by CLIP.
# transformers' "no limit set" model_max_length (int(1e30)); anything this large means unset.
_UNSET_LENGTH = 1_000_000


class VocabularyFileError(FileNotFoundError):
    """CLIP's BPE file is not installed, or the file found is not byte-identical to OpenAI's."""


def bytes_to_unicode() -> tuple[str, ...]:
    """The 256 byte symbols, indexed by byte value, as GPT-2/CLIP define them.

    Printable Latin-1 bytes stand for themselves; the other 68 bytes (controls, space, DEL,
    NBSP, soft hyphen) are shifted to U+0100.. so every symbol is a visible, non-space char.
    The vocabulary lists the printable ones first, then the shifted ones (``vocab_symbols``).
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    shifted = [b for b in range(256) if b not in printable]
    table = {b: chr(b) for b in printable} | {b: chr(256 + n) for n, b in enumerate(shifted)}
    return tuple(table[b] for b in range(256))


def vocab_symbols() -> list[str]:
    """The 256 byte symbols in vocabulary order (printable bytes first, then the shifted ones)."""
    return sorted(bytes_to_unicode(), key=lambda s: (ord(s) >= 256, ord(s)))


def _installed_copies(packages: tuple[str, ...]) -> Iterator[Path]:
    """Every ``BPE_FILE`` inside the given packages, located without importing them."""
    for name in packages:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):  # a broken install, or a module without a spec
            continue
        for folder in (spec.submodule_search_locations or []) if spec else []:
            path = Path(folder) / BPE_FILE
            if path.is_file():
                yield path


def read_bpe_file(path: str | Path) -> bytes:
    """The file's bytes, refused unless they are OpenAI's (checked on the bytes returned)."""
    data = Path(path).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != BPE_SHA256:
        raise VocabularyFileError(
            f"{path} is not OpenAI CLIP's {BPE_FILE} (SHA-256 {digest[:16]}..., expected "
            f"{BPE_SHA256[:16]}...): reinstall the package that holds it, or {INSTALL_HINT}")
    return data


def bpe_vocab_path() -> Path:
    """The first installed copy of CLIP's BPE file whose SHA-256 is OpenAI's."""
    rejected: list[VocabularyFileError] = []
    for path in _installed_copies(BPE_PACKAGES):
        try:
            read_bpe_file(path)
        except VocabularyFileError as e:
            rejected.append(e)
        else:
            return path
    if rejected:
        raise rejected[0]
    raise VocabularyFileError(
        f"CLIP's BPE vocabulary {BPE_FILE} was not found (looked in the Python packages "
        f"{', '.join(BPE_PACKAGES)}): {INSTALL_HINT}")


Merges = tuple[tuple[str, str], ...]


@lru_cache(maxsize=4)
def clip_vocab(bpe_path: str) -> tuple[dict[str, int], Merges]:
    """(token -> id, merges in rank order) for CLIP, from OpenAI's gzipped merge list.

    Vocabulary layout (49,408 ids, the order OpenAI's ``SimpleTokenizer`` builds it in):

        0 ..   255   the 256 byte symbols of ``bytes_to_unicode``
      256 ..   511   the same symbols with the end-of-word marker ``</w>`` appended
      512 .. 49405   one id per merge, the first 48,894 lines after the file's header
    49406, 49407     ``<|startoftext|>``, ``<|endoftext|>``
    """
    lines = gzip.decompress(read_bpe_file(bpe_path)).decode("utf-8").split("\n")
    # Line 0 is a header ('"bpe_simple_vocab_16e6.txt#version: 0.2'); CLIP used the next 48,894.
    merges = tuple(tuple(line.split()) for line in lines[1 : 1 + _NUM_MERGES])
    if len(merges) != _NUM_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(f"{bpe_path} is not CLIP's BPE merge list (expected {_NUM_MERGES} pairs)")
    symbols = vocab_symbols()
    tokens = [*symbols, *(s + "</w>" for s in symbols), *("".join(m) for m in merges), BOS, EOS]
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise ValueError(f"{bpe_path} gave {len(vocab)} distinct tokens, expected {VOCAB_SIZE}")
    return vocab, merges


# ---- tokenizer folders --------------------------------------------------------------------


@dataclass(frozen=True)
class FolderTokenizer:
    """What a ``tokenizer/`` folder decides beyond CLIP's fixed tables."""

    pad: PadMode  # EOS padding (SD-1.x) or id 0, "!" (SD-2.x); see PAD_TOKENS
    max_length: int  # ids per row, BOS and EOS included (77 for every SD checkpoint)


def _text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ModelFolderError(f"{path} is not UTF-8 text (invalid byte at offset {e.start})") \
            from None
    except OSError as e:
        raise ModelFolderError(f"cannot read {path}: {e.strerror or e}") from None


def _json_object(path: Path) -> dict:
    try:
        data = json.loads(_text(path))
    except json.JSONDecodeError as e:
        raise ModelFolderError(f"{path} is not valid JSON: {e}") from None
    except RecursionError:
        raise ModelFolderError(f"{path} is not valid JSON: nested too deeply") from None
    if not isinstance(data, dict):
        raise ModelFolderError(f"{path} must hold a JSON object, not {type(data).__name__}")
    return data


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _vocab_table(table, where: str) -> dict[str, int]:
    if not isinstance(table, dict) or not all(_is_int(i) for i in table.values()):
        raise ModelFolderError(f"{where} must map tokens to integer ids")
    return table


def _merge_pairs(entries, where: str) -> Merges:
    """Merges as tokenizers writes them: ["a", "b"] pairs, or "a b" strings (older files)."""
    if not isinstance(entries, list):
        raise ModelFolderError(f"{where} must be a list of merges")
    pairs = []
    for rank, entry in enumerate(entries):
        pair = entry.split(" ") if isinstance(entry, str) else entry
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(p, str) for p in pair)):
            raise ModelFolderError(f"{where}: merge {rank} is {entry!r}, not a pair of symbols")
        pairs.append(tuple(pair))
    return tuple(pairs)


def _merges_txt(path: Path) -> Merges:
    lines = _text(path).split("\n")
    if lines and lines[0].startswith("#version"):  # the header tokenizers writes
        lines = lines[1:]
    while lines and not lines[-1].strip():
        lines.pop()
    return _merge_pairs(lines, str(path))


def _check_tables(vocab: dict[str, int], merges: Merges, where: str,
                  expected: tuple[dict[str, int], Merges]) -> None:
    """Refuse any vocabulary or merge list but CLIP's, saying where the first difference is."""
    clip_ids, clip_merges = expected
    what = "SD-1.x/2.x tokenize with CLIP's vocabulary only"
    if vocab != clip_ids:
        if len(vocab) != len(clip_ids):
            detail = f"{len(vocab)} tokens, CLIP has {len(clip_ids)}"
        else:
            token = next(t for t in sorted(vocab, key=vocab.get) if clip_ids.get(t) != vocab[t])
            detail = f"token {token!r} has id {vocab[token]}, in CLIP {clip_ids.get(token)}"
        raise ModelFolderError(f"{where} is not CLIP's vocabulary ({detail}); {what}")
    if merges != clip_merges:
        if len(merges) != len(clip_merges):
            detail = f"{len(merges)} merges, CLIP has {len(clip_merges)}"
        else:
            rank = next(r for r, (a, b) in enumerate(zip(merges, clip_merges)) if a != b)
            detail = f"merge {rank} is {' '.join(merges[rank])!r}, in CLIP " \
                     f"{' '.join(clip_merges[rank])!r}"
        raise ModelFolderError(f"{where} is not CLIP's merge list ({detail}); {what}")


def _token_text(value, where: str) -> str:
    """A special token as tokenizer files write it: "text" or {"content": "text", ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    if not isinstance(value, str):
        raise ModelFolderError(f"{where} must be a token string, got {value!r}")
    return value


def _added_tokens(files: Mapping[str, dict], path: Path) -> list[tuple[str, object]]:
    """(content, id) of every token the folder's files add on top of the BPE vocabulary."""
    added: list[tuple[str, object]] = []
    entries = files.get("tokenizer.json", {}).get("added_tokens") or []
    if not isinstance(entries, list):
        raise ModelFolderError(f"{path / 'tokenizer.json'}: added_tokens must be a list")
    for entry in entries:
        if not isinstance(entry, dict):
            raise ModelFolderError(f"{path / 'tokenizer.json'}: added_tokens entry {entry!r} "
                                   "is not an object")
        added.append((_token_text(entry, f"{path / 'tokenizer.json'} added token"),
                      entry.get("id")))
    decoder = files.get("tokenizer_config.json", {}).get("added_tokens_decoder") or {}
    if not isinstance(decoder, dict):
        raise ModelFolderError(f"{path / 'tokenizer_config.json'}: added_tokens_decoder must be "
                               "an object")
    for key, entry in decoder.items():
        token_id = int(key) if key.isdigit() else key
        added.append((_token_text(entry, f"{path / 'tokenizer_config.json'} added token"),
                      token_id))
    added += list(files.get("added_tokens.json", {}).items())
    return added


def _pad_mode(files: Mapping[str, dict], vocab: dict[str, int], path: Path) -> PadMode:
    """The pad token every file that names one agrees on; unnamed, transformers' default (EOS)."""
    named: dict[str, str] = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        config = files.get(name, {})
        for key, want in (("bos_token", BOS), ("eos_token", EOS)):
            if config.get(key) is not None and _token_text(config[key], f"{path / name} {key}") \
                    != want:
                raise ModelFolderError(f"{path / name}: {key} is {config[key]!r}; CLIP's is "
                                       f"{want!r}")
        if config.get("pad_token") is not None:
            named[name] = _token_text(config["pad_token"], f"{path / name} pad_token")
    padding = files.get("tokenizer.json", {}).get("padding")
    if padding is not None:
        if not isinstance(padding, dict) or not isinstance(padding.get("pad_token"), str):
            raise ModelFolderError(f"{path / 'tokenizer.json'}: padding must name a pad_token")
        if padding.get("pad_id") != vocab.get(padding["pad_token"]):
            raise ModelFolderError(f"{path / 'tokenizer.json'}: padding pad_id "
                                   f"{padding.get('pad_id')!r} is not the id of "
                                   f"{padding['pad_token']!r}")
        named["tokenizer.json"] = padding["pad_token"]
    if len(set(named.values())) > 1:
        raise ModelFolderError(f"tokenizer folder {path} names different pad tokens: "
                               + ", ".join(f"{k}: {v!r}" for k, v in named.items()))
    pad = next(iter(named.values()), EOS)
    for mode, token in PAD_TOKENS.items():
        if pad == token:
            return mode  # type: ignore[return-value]
    raise ModelFolderError(f"tokenizer folder {path} pads with {pad!r}; SD models pad with "
                           f"{EOS!r} (SD-1.x) or '!' (SD-2.x)")


def _max_length(config: dict, path: Path) -> int:
    length = config.get("model_max_length")
    if length is None or (isinstance(length, (int, float)) and not isinstance(length, bool)
                          and length >= _UNSET_LENGTH):
        return MAX_LENGTH
    if not _is_int(length) or length < 2:
        raise ModelFolderError(f"{path / 'tokenizer_config.json'}: model_max_length must be an "
                               f"integer of at least 2 (BOS + EOS), got {length!r}")
    return length


def read_tokenizer_folder(path: str | Path) -> FolderTokenizer:
    """Check a ``tokenizer/`` folder is CLIP's tokenizer, in either layout; one-line errors.

    Every table present must equal CLIP's (``tokenizer.json``'s and ``vocab.json`` +
    ``merges.txt``, when a folder has both); BOS/EOS must be CLIP's; the pad token must be
    one of SD's two (and every file naming it must agree); tokens added on top of the vocabulary
    must be CLIP tokens at their own ids (textual-inversion tokens are refused, not ignored).
    """
    path = Path(path)
    if not path.is_dir():
        raise ModelFolderError(f"tokenizer folder not found: {path}")
    present = {p.name for p in path.iterdir()}
    if "tokenizer.json" not in present and "vocab.json" not in present:
        raise ModelFolderError(f"tokenizer folder {path} has neither tokenizer.json nor "
                               "vocab.json + merges.txt")
    if "vocab.json" in present and "merges.txt" not in present:
        raise ModelFolderError(f"tokenizer folder {path} has vocab.json but no merges.txt")
    files = {name: _json_object(path / name)
             for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                          "added_tokens.json", "vocab.json")
             if name in present}
    expected = clip_vocab(str(bpe_vocab_path()))
    if "tokenizer.json" in files:
        model = files["tokenizer.json"].get("model")
        where = f"{path / 'tokenizer.json'}"
        if not isinstance(model, dict) or model.get("type") != "BPE":
            raise ModelFolderError(f"{where} does not hold a BPE model; CLIP's tokenizer is BPE")
        _check_tables(_vocab_table(model.get("vocab"), f"{where} model.vocab"),
                      _merge_pairs(model.get("merges"), f"{where} model.merges"), where, expected)
    if "vocab.json" in files:
        _check_tables(_vocab_table(files["vocab.json"], str(path / "vocab.json")),
                      _merges_txt(path / "merges.txt"), f"{path} vocab.json + merges.txt",
                      expected)
    vocab = expected[0]
    foreign = [(token, i) for token, i in _added_tokens(files, path) if vocab.get(token) != i]
    if foreign:
        shown = ", ".join(f"{t!r} (id {i})" for t, i in foreign[:3])
        raise ModelFolderError(f"tokenizer folder {path} adds tokens that are not CLIP's: "
                               f"{shown}; added (e.g. textual-inversion) tokens are not supported")
    return FolderTokenizer(pad=_pad_mode(files, vocab, path),
                           max_length=_max_length(files.get("tokenizer_config.json", {}), path))
