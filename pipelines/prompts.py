"""Prompts as AUTOMATIC1111 reads them: attention weights, BREAK, 75-token windows, CLIP skip.

Three pure steps turn a prompt into the text states the UNet cross-attends to:

1. ``parse_attention`` (A1111's ``modules/prompt_parser.py: parse_prompt_attention``): the text
   becomes fragments with weights. ``(x)`` multiplies x's weight by 1.1, ``[x]`` divides it by
   1.1, ``(x:1.3)`` multiplies it by 1.3, nesting multiplies, ``\\( \\) \\[ \\] \\\\`` are the
   literal characters, and ``BREAK`` (upper case, a word of its own) ends the current window.
   Unbalanced brackets follow A1111 exactly: a ``(`` or ``[`` never closed applies its factor
   (1.1, 1/1.1) to everything after it, to the end of the prompt; a ``)`` or ``]`` with no open
   bracket of its kind is a literal character; ``:1.3)`` with no ``(`` open is literal text, and
   so is a ``:`` not followed by a number and ``)``. A lone backslash before any other character
   is dropped (A1111 too). Adjacent fragments of equal weight are merged.
2. ``prompt_windows`` (A1111's ``sd_hijack_clip.py: tokenize_line``): the fragments' CLIP tokens
   are cut into windows of ``max_length - 2`` (75) tokens. When a window is full and the last
   comma in it is at most ``COMMA_BACKTRACK`` (20, A1111's ``comma_padding_backtrack`` default)
   tokens from its end, the tokens after that comma move to the next window, so a comma-separated
   phrase is not split. Each window is framed BOS, tokens, EOS and padded to 77 with the
   tokenizer's pad id (what ``SDTokenizer.__call__`` writes, so a plain prompt's one window is
   the very row it always was). BREAK ends a window early (``BREAK`` first gives an empty window
   first, as in A1111).
3. ``encode_windows``: every window goes through the text encoder on its own (CLIP is causal and
   its 77 positions are learned, so windows cannot share a pass); with ``clip_skip`` N > 1 the
   hidden states of the N-th layer from the end, with the encoder's final layer norm applied;
   then each token's states are scaled by its weight and the window's mean restored (A1111's
   "Original" emphasis: z <- z * w; z <- z * mean(z_before) / mean(z_after)); and the windows
   are concatenated along the sequence axis, (B, 77 * k, D). Prompts with fewer windows than the
   longest of the call (the negative prompt, the other prompts of a batch) are padded with empty
   windows (BOS, EOS, padding: the encoding of ""), as A1111 pads cond and uncond.

Two deliberate differences from A1111, both where its behaviour is an accident:

- the mean restored is that of one window of one prompt; A1111 takes it over the whole batch of
  that window index, so its image j of a batch depends on the other prompts of the batch;
- ``BREAK`` inside brackets still breaks; A1111 multiplies its marker weight (-1) by the
  brackets' factor, no longer recognises it, and encodes the word "break" with a negative weight.

CLIP skip counts as A1111 does: 1 = the last layer (no change), 2 = the penultimate. diffusers'
``clip_skip`` counts the layers skipped: its ``clip_skip=1`` is A1111's (and our) 2.

Textual-inversion embeddings (pipelines.embeddings) are found in step 2 by their names' tokens
and take one position per vector; in step 3 their vectors replace the token embeddings there.
"""

from __future__ import annotations

import contextvars
import numbers
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ldm_engine.errors import UserInputError
from ldm_engine.tokenizer import SDTokenizer

from .embeddings import Embedding

ROUND = 1.1            # (text): A1111's round_bracket_multiplier
SQUARE = 1 / 1.1       # [text]: A1111's square_bracket_multiplier
COMMA_BACKTRACK = 20   # A1111's comma_padding_backtrack default (Settings > Optimizations)

# The prompt's lexemes, tried in order: escapes (a backslash and the character after it, or a
# lone backslash), the brackets, a weight closing a round bracket, the closers, plain text, ":".
_LEXEME = re.compile(r"""
    (?P<escape>\\[()\[\]\\]?)
  | (?P<open>[(\[])
  | :\s*(?P<weight>[+-]?[.\d]+)\s*\)
  | (?P<close>[)\]])
  | (?P<text>[^\\()\[\]:]+|:)
""", re.VERBOSE)
# A1111's BREAK: the word, with the blanks around it.
_BREAK = re.compile(r"\s*\bBREAK\b\s*")


class _Break:
    """The BREAK marker in a parsed prompt."""

    def __repr__(self) -> str:
        return "BREAK"


BREAK = _Break()


@dataclass(frozen=True)
class Fragment:
    text: str
    weight: float


def parse_attention(prompt: str) -> tuple[Fragment | _Break, ...]:
    """Fragments of text with their attention weights, and BREAK markers (see the module doc).

    A weight that is no number (``(a:1.2.3)``, ``(a:.)``: A1111 fails with a ValueError) is a
    one-line UserInputError.
    """
    # Entries are [text, weight] (mutable while brackets close) or BREAK.
    out: list[list | _Break] = []
    opened: dict[str, list[int]] = {"(": [], "[": []}

    def scale_from(start: int, factor: float) -> None:
        for entry in out[start:]:
            if entry is not BREAK:
                entry[1] *= factor

    for m in _LEXEME.finditer(prompt):
        if m["escape"] is not None:
            out.append([m["escape"][1:], 1.0])
        elif m["open"] is not None:
            opened[m["open"]].append(len(out))
        elif m["weight"] is not None and opened["("]:
            try:
                factor = float(m["weight"])
            except ValueError:
                raise UserInputError(f"prompt weight {m['weight']!r} in {m[0]!r} is not a "
                                     "number") from None
            scale_from(opened["("].pop(), factor)
        elif m["close"] == ")" and opened["("]:
            scale_from(opened["("].pop(), ROUND)
        elif m["close"] == "]" and opened["["]:
            scale_from(opened["["].pop(), SQUARE)
        else:
            # Plain text, ":", an unmatched closer, a weight with no "(" open: literal text.
            for k, part in enumerate(_BREAK.split(m[0])):
                if k:
                    out.append(BREAK)
                out.append([part, 1.0])
    # Brackets never closed apply their factor to the end of the prompt.
    for start in opened["("]:
        scale_from(start, ROUND)
    for start in opened["["]:
        scale_from(start, SQUARE)

    merged: list[Fragment | _Break] = []
    for entry in out:
        if entry is BREAK:
            merged.append(BREAK)
        elif merged and merged[-1] is not BREAK and merged[-1].weight == entry[1]:
            merged[-1] = Fragment(merged[-1].text + entry[0], entry[1])
        else:
            merged.append(Fragment(entry[0], entry[1]))
    return tuple(merged) or (Fragment("", 1.0),)


def plain_text(prompt: str) -> str:
    """The words of a prompt without its syntax: weights and emphasis brackets dropped, escapes
    resolved, BREAK a blank, runs of blanks one space. What a CLIP scoring the image against the
    prompt reads (pipelines.rerank): ``"a (red:1.3) circle BREAK [green] background"`` ->
    ``"a red circle green background"``. Syntax this engine reads as literal text (A1111's
    ``[from:to:when]`` prompt editing, ``[a|b]`` alternation) stays, since the image was
    conditioned on it as written."""
    words = " ".join(" " if f is BREAK else f.text for f in parse_attention(prompt))
    return " ".join(words.split())


@dataclass(frozen=True)
class PromptWindows:
    """A prompt's CLIP windows: each row BOS, up to 75 tokens, EOS, padding (77 ids), and the
    weight of every position (1.0 for BOS, EOS and padding). fixes: per window, the
    (position, Embedding) of each textual-inversion embedding whose vectors replace the token
    embeddings there (their ids are placeholders, 0, as in A1111)."""

    ids: tuple[tuple[int, ...], ...]
    weights: tuple[tuple[float, ...], ...]
    fixes: tuple[tuple[tuple[int, Embedding], ...], ...] = ()

    @property
    def weighted(self) -> bool:
        return any(w != 1.0 for row in self.weights for w in row)


def prompt_windows(tokenizer: SDTokenizer, prompt: str,
                   embeddings: Sequence[Embedding] = ()) -> PromptWindows:
    """The prompt's 77-id windows (A1111's tokenize_line; see the module docstring).

    A textual-inversion embedding's name, found by its CLIP tokens (longest names first), takes
    as many positions as it has vectors; one that does not fit in what is left of the window
    starts the next (A1111)."""
    size = tokenizer.max_length - 2                  # tokens per window: 75
    comma = tokenizer.encode(",")[0]
    lookup = sorted(((tuple(tokenizer.encode(e.name)), e) for e in embeddings),
                    key=lambda pair: -len(pair[0]))
    windows: list[tuple[list[int], list[float], list[tuple[int, Embedding]]]] = []
    tokens: list[int] = []
    weights: list[float] = []
    fixes: list[tuple[int, Embedding]] = []
    last_comma = -1                                   # index in `tokens`, -1: none

    def close_window() -> None:
        nonlocal tokens, weights, fixes, last_comma
        pad = tokenizer.max_length - 1 - len(tokens)  # EOS, then padding to 77
        windows.append(([tokenizer.bos_id, *tokens, tokenizer.eos_id]
                        + [tokenizer.pad_id] * (pad - 1),
                        [1.0, *weights, 1.0] + [1.0] * (pad - 1), fixes))
        tokens, weights, fixes, last_comma = [], [], [], -1

    for fragment in parse_attention(prompt):
        if fragment is BREAK:
            close_window()
            continue
        ids = tokenizer.encode(fragment.text)
        pos = 0
        while pos < len(ids):
            token = ids[pos]
            if token == comma:
                last_comma = len(tokens)
            elif len(tokens) == size and last_comma != -1 and size - last_comma <= COMMA_BACKTRACK:
                # Full, and a comma near its end: what follows the comma opens the next window
                # (embeddings in that part too, which A1111 leaves behind).
                cut = last_comma + 1
                tail, tail_weights = tokens[cut:], weights[cut:]
                tail_fixes = [(p - cut, e) for p, e in fixes if p - 1 >= cut]
                tokens, weights = tokens[:cut], weights[:cut]
                fixes = [(p, e) for p, e in fixes if p - 1 < cut]
                close_window()
                tokens, weights, fixes = tail, tail_weights, tail_fixes
            if len(tokens) == size:
                close_window()
            found = next((e for name, e in lookup if name and tuple(ids[pos:pos + len(name)])
                          == name), None)
            if found is None:
                tokens.append(token)
                weights.append(fragment.weight)
                pos += 1
                continue
            if len(tokens) + found.count > size:
                close_window()
            fixes.append((len(tokens) + 1, found))    # + 1: the row's BOS
            tokens.extend([0] * found.count)
            weights.extend([fragment.weight] * found.count)
            pos += len(tokenizer.encode(found.name))
    if tokens or not windows:
        close_window()
    return PromptWindows(tuple(tuple(ids) for ids, _, _ in windows),
                         tuple(tuple(w) for _, w, _ in windows),
                         tuple(tuple(f) for _, _, f in windows))


def empty_window(tokenizer: SDTokenizer) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """The window of "": BOS, EOS, padding; every weight 1."""
    n = tokenizer.max_length
    return ((tokenizer.bos_id, tokenizer.eos_id) + (tokenizer.pad_id,) * (n - 2), (1.0,) * n)


def text_layers(text_encoder: torch.nn.Module) -> int:
    """How many transformer layers the text encoder has: the largest valid clip_skip."""
    return int(text_encoder.config.num_hidden_layers)


def check_clip_skip(clip_skip, layers: int | None = None) -> None:
    """clip_skip is a whole number from 1 (the last layer) to the encoder's layer count."""
    if not isinstance(clip_skip, numbers.Integral) or isinstance(clip_skip, bool) or clip_skip < 1:
        raise UserInputError(f"clip skip must be a whole number >= 1 (1 = the last layer, "
                             f"A1111's numbering), got {clip_skip!r}")
    if layers is not None and clip_skip > layers:
        raise UserInputError(f"clip skip {clip_skip} is more than this text encoder's {layers} "
                             f"layers; use 1 to {layers}")


def _final_layer_norm(text_encoder: torch.nn.Module) -> torch.nn.Module:
    # transformers 5's CLIPTextModel holds it directly; 4.x under `text_model`.
    inner = getattr(text_encoder, "text_model", text_encoder)
    return inner.final_layer_norm


def hidden_states(text_encoder: torch.nn.Module, ids: torch.Tensor, clip_skip: int = 1
                  ) -> torch.Tensor:
    """(N, 77) ids -> (N, 77, D) states of the clip_skip-th layer from the end.

    clip_skip 1 is the encoder's own output (its last layer, final layer norm applied), the
    very call made for every prompt before clip skip existed. N > 1 takes the N-th last entry of
    the per-layer hidden states (entry 0 is the embeddings, entry L the last layer's output
    before the norm) and applies the final layer norm, as A1111 (``hidden_states[-N]``) and
    diffusers (``hidden_states[-(clip_skip + 1)]`` with its clip_skip = N - 1) do.
    """
    if clip_skip == 1:
        return text_encoder(ids)[0]
    out = text_encoder(ids, output_hidden_states=True)
    return _final_layer_norm(text_encoder)(out.hidden_states[-clip_skip])


def apply_weights(z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A1111's "Original" emphasis on one window: z (77, D), weights (77,).

    Each position's states are multiplied by its weight, then the whole window is rescaled so
    that its mean over positions and channels is what it was: z' = z * w * mean(z) / mean(z * w).
    """
    # In fp32 whatever the encoder's dtype (A1111 works in the model's, fp16 on GPUs).
    zf = z.float()
    before = zf.mean()
    scaled = zf * weights[:, None].float()
    after = scaled.mean()
    if after == 0 or not torch.isfinite(after):
        raise UserInputError("prompt weights scale the text states to a zero or non-finite mean; "
                             "use other weights")
    return (scaled * (before / after)).to(z.dtype)


# (row, position, vectors) of the embeddings to put into the token embeddings of the encoder call
# being made in this thread / context; None outside such a call (see _with_fixes).
_FIXES: contextvars.ContextVar = contextvars.ContextVar("ldm_engine_embedding_fixes", default=None)
_HOOK_LOCK = threading.Lock()


def _apply_fixes(module, args, output):
    fixes = _FIXES.get()
    if fixes is None:
        return None                                   # unchanged: every call without embeddings
    output = output.clone()
    for row, pos, vectors in fixes:
        output[row, pos:pos + len(vectors)] = vectors.to(output)
    return output


def _with_fixes(text_encoder: torch.nn.Module, ids: torch.Tensor, clip_skip: int,
                fixes: list[tuple[int, int, torch.Tensor]]) -> torch.Tensor:
    """hidden_states with embedding vectors in place of the token embeddings at `fixes`.

    CLIPTextModel takes no input embeddings in transformers 5, so (as A1111's
    EmbeddingsWithFixes) the token embedding layer gets a forward hook, installed once per
    encoder and inert unless this context has fixes set: the weights are never changed, and
    concurrent generations (each thread its own context) never see each other's embeddings.
    """
    layer = text_encoder.get_input_embeddings()
    if not getattr(layer, "_ldm_engine_fixes", False):
        with _HOOK_LOCK:
            if not getattr(layer, "_ldm_engine_fixes", False):
                layer.register_forward_hook(_apply_fixes)
                layer._ldm_engine_fixes = True
    token = _FIXES.set(fixes)
    try:
        return hidden_states(text_encoder, ids, clip_skip)
    finally:
        _FIXES.reset(token)


def encode_prompts(tokenizer: SDTokenizer, text_encoder: torch.nn.Module, texts: Sequence[str],
                   *, clip_skip: int = 1, device: torch.device | str = "cpu",
                   embeddings: Sequence[Embedding] = ()) -> torch.Tensor:
    """Text states (B, 77 * k, D) for the texts, k the most windows any of them has.

    Each distinct text is parsed and goes through the encoder once. All windows of the call,
    padded to k per text with empty windows, are encoded in one batch; a call of plain prompts
    (one window, no weights) passes the encoder exactly the (U, 77) ids it always did.
    """
    unique = list(dict.fromkeys(texts))
    parsed = [prompt_windows(tokenizer, t, embeddings) for t in unique]
    k = max(len(p.ids) for p in parsed)
    pad_ids, _ = empty_window(tokenizer)
    ids = torch.tensor([row for p in parsed for row in p.ids + (pad_ids,) * (k - len(p.ids))],
                       dtype=torch.long, device=device)
    fixes = [(u * k + j, pos, e.vectors) for u, p in enumerate(parsed)
             for j, window in enumerate(p.fixes) for pos, e in window]
    if fixes:
        states = _with_fixes(text_encoder, ids, clip_skip, fixes)       # (U * k, 77, D)
    else:
        states = hidden_states(text_encoder, ids, clip_skip)            # (U * k, 77, D)
    if any(p.weighted for p in parsed):
        states = states.clone()
        for u, p in enumerate(parsed):
            for j, row in enumerate(p.weights):
                if any(w != 1.0 for w in row):
                    w = torch.tensor(row, dtype=torch.float32, device=states.device)
                    states[u * k + j] = apply_weights(states[u * k + j], w)
    n, length, dim = states.shape
    states = states.reshape(len(unique), k * length, dim)                # (U, 77 * k, D)
    index = torch.tensor([unique.index(t) for t in texts], device=states.device)
    return states.index_select(0, index)
