"""The Stable Diffusion 1.x prompt tokenizer: CLIP ViT-L/14's byte-level BPE, built offline.

SD-1.x conditions on OpenAI CLIP ViT-L/14's text tower, so its tokenizer is CLIP's (Radford et al.
2021): prompts are cleaned, split into words, each word's UTF-8 bytes are BPE-merged, and the
ids are framed as ``<|startoftext|> tokens <|endoftext|>`` padded to 77 positions. The vocabulary
is rebuilt from OpenAI's BPE merge list ``bpe_simple_vocab_16e6.txt.gz``, found in an installed
package and checked by SHA-256 (``vocab.py``), so nothing is ever fetched from a model hub.

Ids are those of OpenAI's ``SimpleTokenizer`` (tested on every assigned code point), which
open_clip copies except for one renaming: like OpenAI's original tokenizer and the Hugging Face
port that SD-1.x used, the literal strings ``<|startoftext|>``/``<|endoftext|>`` in a prompt become
the special ids; open_clip renamed its special tokens and matches ``<start_of_text>``/
``<end_of_text>`` instead, which here are ordinary text.
"""

from __future__ import annotations

import html
import json
import warnings
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import ftfy
import regex
import torch
from transformers import CLIPTokenizer

from .vocab import (  # noqa: F401  (re-exported: the tokenizer's public constants)
    BOS,
    BOS_ID,
    EOS,
    EOS_ID,
    MAX_LENGTH,
    PAD_TOKENS,
    VOCAB_SIZE,
    PadMode,
    VocabularyFileError,
    bpe_vocab_path,
    bytes_to_unicode,
    clip_vocab,
    read_tokenizer_folder,
    vocab_symbols,
)

# What ``save`` writes: the layout of published SD folders, readable by any transformers version.
_FOLDER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")

# OpenAI CLIP's word pattern, flags included. IGNORECASE is not cosmetic: under it U+0345
# (combining ypogegrammeni, which case-folds to a letter) matches no branch and is dropped.
_WORD_RE = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)


class PromptTruncatedWarning(UserWarning):
    """A prompt had more than ``max_length - 2`` tokens; the tail was dropped."""


_BYTE_SYMBOL = bytes_to_unicode()


@lru_cache(maxsize=8)
def _hf_from_bpe(bpe_path: str, pad: PadMode, max_length: int = MAX_LENGTH) -> CLIPTokenizer:
    vocab, merges = clip_vocab(bpe_path)
    # transformers 5.x takes the tables themselves (`vocab=`, `merges=`); its `vocab_file=` and
    # `merges_file=` keywords are only read by from_pretrained and here would silently give a
    # 2-token vocabulary.
    return CLIPTokenizer(
        vocab=dict(vocab), merges=list(merges), pad_token=PAD_TOKENS[pad], model_max_length=max_length
    )


def clean_prompt(text: str) -> str:
    """OpenAI CLIP's cleaning (open_clip's 'lower'), then CLIP's word split, joined by spaces.

    transformers' CLIPTokenizer (5.x, tokenizers backend) normalises with only NFC, ``\\s+`` -> " "
    and lower-casing, while OpenAI CLIP and open_clip run ``ftfy.fix_text``, ``html.unescape``
    twice, whitespace collapse and ``str.lower``. Handing it raw text changes the ids of e.g.
    "Tom &amp; Jerry", "cafÃ©" (mojibake), "ﬁne" (ligature), "ＦＵＬＬ" (full width), "“quotes”",
    ANSI escapes and control chars, and "ΟΔΟΣ" loses its final sigma (Rust lower-cases char by
    char). SD-1.x itself (CompVis' FrozenCLIPEmbedder) used transformers 4.x's slow
    CLIPTokenizer: ``ftfy.fix_text``, whitespace collapse and lower-casing, without the extra
    ``html.unescape`` ("&amp;amp;" stayed "&amp;"), or a BERT BasicTokenizer if ftfy was missing.
    We follow OpenAI CLIP and open_clip, the reference the SD-2.x text encoders were trained with.
    """
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))
    text = " ".join(text.split()).lower()
    return " ".join(_WORD_RE.findall(text))


class SDTokenizer:
    """Prompt -> (B, 77) CLIP ids, identical to OpenAI CLIP's ``SimpleTokenizer`` and
    ``clip.tokenize`` (with ``pad="zero"``; ``"eos"`` repeats EOS where they write 0).

    Wraps a transformers ``CLIPTokenizer`` (attribute ``hf``) so diffusers pipelines can be handed
    the very same tokenizer, and ``save`` writes it as a diffusers ``tokenizer/`` folder. ``hf``
    tokenizes text itself without the cleaning above, and when it pads with "!" (SD-2.x style) it
    also splits every "!" out as a special token ("wow!!!" -> 0 0 0 rather than "!!!</w>"), the
    quirk of SD-2's published tokenizer folder (pad_token "!"). So ``__call__`` takes only the BPE model and the special
    ids from ``hf``: clean + split as CLIP does, BPE each word, frame and pad here.
    """

    def __init__(self, hf: CLIPTokenizer, *, max_length: int = MAX_LENGTH):
        if hf.bos_token_id is None or hf.eos_token_id is None or hf.pad_token_id is None:
            raise ValueError("tokenizer needs bos, eos and pad tokens")
        self.hf = hf
        self.max_length = max_length
        self.bos_id: int = hf.bos_token_id
        self.eos_id: int = hf.eos_token_id
        self.pad_id: int = hf.pad_token_id
        self._special_ids = {hf.bos_token: self.bos_id, hf.eos_token: self.eos_id}
        self._bpe = hf.backend_tokenizer.model

    @classmethod
    def from_bpe(cls, pad: PadMode = "eos") -> SDTokenizer:
        """CLIP ViT-L/14's tokenizer from OpenAI's BPE file. ``pad``: see ``PAD_TOKENS``.

        The wrapped CLIPTokenizer is built once per process and pad mode and shared by every
        instance, so treat ``hf`` as read-only (no ``add_tokens``)."""
        if pad not in PAD_TOKENS:
            raise ValueError(f"pad must be one of {sorted(PAD_TOKENS)}, got {pad!r}")
        return cls(_hf_from_bpe(str(bpe_vocab_path()), pad))

    @classmethod
    def from_folder(cls, path: str | Path) -> SDTokenizer:
        """A diffusers ``tokenizer/`` folder in either layout: ``vocab.json`` + ``merges.txt``
        (published SD folders, ``save``) or ``tokenizer.json`` (transformers 5's save_pretrained).

        The folder must hold CLIP's tables (``read_tokenizer_folder``, else a one-line
        ``ModelFolderError``); the tokenizer is then built from the checked BPE file with the
        folder's padding and row length, so every folder with CLIP's vocabulary tokenizes
        alike, whatever normalizer or pre-tokenizer its tokenizer.json spells out."""
        spec = read_tokenizer_folder(path)
        hf = _hf_from_bpe(str(bpe_vocab_path()), spec.pad, spec.max_length)
        return cls(hf, max_length=spec.max_length)

    def save(self, path: str | Path) -> None:
        """Write vocab.json, merges.txt (``#version: 0.2`` header), tokenizer_config.json and
        special_tokens_map.json, the layout diffusers' SD checkpoints use; no tokenizer.json, so
        any transformers version rebuilds the tokenizer from the tables."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self._bpe.save(str(path))  # vocab.json, merges.txt
        special = {
            "bos_token": self.hf.bos_token,
            "eos_token": self.hf.eos_token,
            "pad_token": self.hf.pad_token,
            "unk_token": self.hf.unk_token,
        }
        config = {
            "tokenizer_class": "CLIPTokenizer",
            "model_max_length": self.max_length,
            "do_lower_case": True,
            "errors": "replace",
            "add_prefix_space": False,
            **special,
        }
        for name, content in (("special_tokens_map.json", special), ("tokenizer_config.json", config)):
            (path / name).write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")

    def encode(self, prompt: str) -> list[int]:
        """The prompt's token ids, without BOS/EOS and without truncation."""
        ids: list[int] = []
        for word in clean_prompt(prompt).split(" "):
            if word in self._special_ids:
                ids.append(self._special_ids[word])
            elif word:  # "" when the prompt cleans to nothing
                symbols = "".join(_BYTE_SYMBOL[b] for b in word.encode("utf-8"))
                ids.extend(token.id for token in self._bpe.tokenize(symbols))
        return ids

    def __call__(self, prompts: str | Sequence[str]) -> torch.LongTensor:
        """(B, max_length) int64 rows: BOS, tokens, EOS, padding.

        A prompt with more than ``max_length - 2`` tokens keeps its first ``max_length - 2``
        (open_clip cuts the framed row and overwrites the last id with EOS: the same row) and
        issues a ``PromptTruncatedWarning`` showing the dropped text.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        rows = torch.full((len(prompts), self.max_length), self.pad_id, dtype=torch.long)  # (B, 77)
        keep = self.max_length - 2
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise TypeError(f"prompts must be strings, got {type(prompt).__name__}")
            ids = self.encode(prompt)
            if len(ids) > keep:
                dropped = self._decode_tokens(ids[keep:])
                message = f"prompt truncated to {self.max_length} CLIP tokens; dropped: {dropped!r}"
                warnings.warn(PromptTruncatedWarning(message), stacklevel=2)
                ids = ids[:keep]
            rows[i, : len(ids) + 2] = torch.tensor([self.bos_id, *ids, self.eos_id])
        return rows

    def decode(self, ids: torch.Tensor | Sequence[int]) -> str:
        """Text of one row (or of bare token ids): a leading BOS, and an EOS followed only by
        padding, are removed; words are separated by single spaces."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        if any(isinstance(i, (list, tuple, torch.Tensor)) for i in ids):
            raise ValueError("decode takes one row of ids; decode a batch row by row")
        ids = [int(i) for i in ids]
        if ids and ids[0] == self.bos_id:
            ids = ids[1:]
        pad_start = len(ids)
        while pad_start > 0 and ids[pad_start - 1] == self.pad_id:
            pad_start -= 1
        # The frame's EOS is the first EOS from which on everything is padding (with EOS padding
        # it opens the padding run itself; with "!" padding it sits just before it).
        for end in range(max(pad_start - 1, 0), len(ids)):
            if ids[end] == self.eos_id:
                ids = ids[:end]
                break
        return self._decode_tokens(ids)

    def _decode_tokens(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
