"""Text <-> token ids from the file's own ``tokenizer.ggml.*`` keys, with HF ``tokenizers``.

gpt2-style byte-level BPE (``tokenizer.ggml.model = gpt2``): vocabulary and
merges from the file, the pre-tokenizer regex that ``tokenizer.ggml.pre`` names
(as llama.cpp's llama-vocab.cpp); SentencePiece (``llama``, Mixtral's): pieces and
scores, U+2581 for spaces, byte tokens for the rest. Control and user-defined tokens as special
tokens. Their text is matched only where asked (``special=True``, llama.cpp's
``parse_special``): in a chat prompt, only in the template's own text, never in
the messages, so a user cannot write a control token. ``decode(encode(s)) == s``
for any text. The chat template is rendered in jinja2's immutable
sandbox: a template is code from the file's author. The sandbox stops a template
from reaching Python's internals, not from looping forever or rendering gigabytes,
so it renders in a child process with a time, memory and output bound
(``CHAT_TIMEOUT_S``, ``CHAT_MEMORY_BYTES``, ``CHAT_MAX_CHARS``), CPU time too, started
isolated (``python -I``: not the working directory's modules) and killed with its parent.
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import threading

import numpy as np
from gguf.constants import Keys, TokenType

from .gguf import GGUFError

__all__ = ["Tokenizer", "PRE_TOKENIZERS", "IGNORE_MERGES", "pre_tokenizer", "CHAT_TIMEOUT_S", "CHAT_MEMORY_BYTES",
           "CHAT_MAX_CHARS"]

# What a chat template may take: real ones render one message in milliseconds and a few kB.
CHAT_TIMEOUT_S = 10.0  # wall clock, child start included
CHAT_MEMORY_BYTES = 1 << 30  # the rendering process's address space
CHAT_MAX_CHARS = 1 << 20  # beyond the messages' own text

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
# llama.cpp's splits for a file without tokenizer.ggml.pre (or "default"), in turn
_DEFAULT = (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]")
_LLAMA3 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_O200K = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# DeepSeek's own splits, run one after the other (llama.cpp's LLAMA_VOCAB_PRE_TYPE_DEEPSEEK_LLM, _DEEPSEEK3_LLM),
# as escapes: some range ends (U+1F7D) are characters an editor's NFC normalisation would change.
_DEEPSEEK_LLM = (
    '[\r\n]',
    '\\s?[A-Za-z\xb5\xc0-\xd6\xd8-\xf6\xf8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af\u0370-\u0373\u0376'
    '\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5\u03f7-\u0481\u048a-\u052f'
    '\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77'
    '\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-'
    '\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec'
    '\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102\u2107\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d'
    '\u212f-\u2134\u2139\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee'
    '\u2cf2\u2cf3\ua640-\ua66d\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06'
    '\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3\U000104d8-\U000104fb'
    '\U00010c80-\U00010cb2\U00010cc0-\U00010cf2\U000118a0-\U000118df\U0001e900-\U0001e943]+',
    '\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+',
    '\\s+$',
    '[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+',
    '\\p{N}+',
)
_DEEPSEEK_V3 = (
    '\\p{N}{1,3}',
    '[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+',
    '[!"#$%&\'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| ?[\\p{P}'
    '\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+',
)
# tokenizer.ggml.pre -> the split regex llama.cpp uses for it (a tuple: splits run in turn on each piece)
PRE_TOKENIZERS = {"default": _DEFAULT, "gpt-2": _GPT2, "phi-2": _GPT2, "mpt": _GPT2, "olmo": _GPT2,
                  "starcoder": (r"\p{N}", _GPT2), "gpt-4o": _O200K, "llama4": _O200K, "qwen2": _QWEN2,
                  "deepseek-r1-qwen": _QWEN2, "llama-bpe": _LLAMA3, "llama3": _LLAMA3, "llama-v3": _LLAMA3,
                  "dbrx": _LLAMA3, "smaug-bpe": _LLAMA3, "glm4": _LLAMA3, "glm5": _LLAMA3, "chatglm-bpe": _LLAMA3,
                  "deepseek-llm": _DEEPSEEK_LLM, "deepseek-v3": _DEEPSEEK_V3}
# llama.cpp's ignore_merges: a piece that is itself a token is that token, whatever the merges say
IGNORE_MERGES = frozenset({"llama-bpe", "llama3", "llama-v3", "glm4", "glm5"})


def pre_tokenizer(pre):
    """The HF pre-tokenizer of ``tokenizer.ggml.pre = pre``: its splits, then the byte-level alphabet."""
    from tokenizers import Regex, pre_tokenizers

    exprs = PRE_TOKENIZERS[pre]
    return pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(e), behavior="isolated") for e in ((exprs,) if isinstance(exprs, str) else exprs)]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


# tokenizer.ggml.model values (names of tokenizer kinds, not architectures)
BPE_MODEL, SPM_MODEL = "gpt2", "llama"


def _byte_level_bpe(vocab, merges, pre):
    """The HF tokenizer of a gpt2-style vocabulary: the pre-tokenizer's splits, byte-level BPE."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

    # Byte-level BPE spells every text with these 256 symbols; without one, the BPE
    # would drop that byte from a prompt without a word (llama.cpp throws on it).
    missing = [c for c in pre_tokenizers.ByteLevel.alphabet() if c not in vocab]
    if missing:
        raise ValueError(f"the vocabulary lacks {len(missing)} of the 256 byte tokens "
                         f"(e.g. {sorted(missing)[0]!r}): not a byte-level BPE vocabulary")
    pairs = []
    for m in merges:
        a, sep, b = m.partition(" ")
        if not sep:
            raise ValueError(f"merge {m!r} is not two tokens separated by a space")
        pairs.append((a, b))
    try:
        bpe = models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, ignore_merges=pre in IGNORE_MERGES)
    except Exception as e:  # tokenizers raises a plain Exception (a merge of unknown tokens)
        raise ValueError(str(e)) from None
    tok = HFTokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizer(pre)
    tok.decoder = decoders.ByteLevel()
    return tok


SPM_SPACE = "\u2581"  # SentencePiece's visible space


def _sentencepiece_bpe(tokens, vocab, scores, token_types, add_space_prefix):
    """The HF tokenizer of a SentencePiece vocabulary (``tokenizer.ggml.model = llama``, as llama.cpp's
    llm_tokenizer_spm): spaces as U+2581 (one before the text with ``add_space_prefix``), adjacent
    pieces merged highest score first, characters outside the vocabulary as ``<0xXX>`` byte tokens.
    The merges are every split of a piece into two pieces, ranked by the piece's score."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, normalizers

    if scores is None or len(scores) != len(tokens):
        raise ValueError(f"a SentencePiece vocabulary needs one score per token ({len(tokens)}), got "
                         f"{'none' if scores is None else len(scores)}")
    scores = np.asarray(scores, np.float64)
    if not np.isfinite(scores).all():
        raise ValueError("the token scores hold NaN or inf")
    missing = [b for b in range(256) if f"<0x{b:02X}>" not in vocab]
    if missing:
        raise ValueError(f"the vocabulary lacks {len(missing)} of the 256 byte tokens (e.g. <0x{missing[0]:02X}>): "
                         "llama.cpp spells characters outside the vocabulary with them")
    types = np.full(len(tokens), int(TokenType.NORMAL)) if token_types is None else np.asarray(token_types)
    merges = []
    for i, t in enumerate(tokens):
        if len(t) < 2 or types[i] not in (TokenType.NORMAL, TokenType.USER_DEFINED) or vocab[t] != i:
            continue
        for j in range(1, len(t)):
            a, b = t[:j], t[j:]
            if a in vocab and b in vocab:
                merges.append((-scores[i], i, vocab[a], a, b))
    merges.sort()
    unk = next((t for t, ty in zip(tokens, types) if ty == TokenType.UNKNOWN), None)
    try:
        bpe = models.BPE(vocab=vocab, merges=[(a, b) for *_, a, b in merges], unk_token=unk, fuse_unk=True,
                         byte_fallback=True)
    except Exception as e:
        raise ValueError(str(e)) from None
    tok = HFTokenizer(bpe)
    space = [normalizers.Replace(" ", SPM_SPACE)]
    tok.normalizer = normalizers.Sequence(([normalizers.Prepend(SPM_SPACE)] if add_space_prefix else []) + space)
    tok.decoder = decoders.Sequence([decoders.Replace(SPM_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
                                    + ([decoders.Strip(" ", 1, 0)] if add_space_prefix else []))
    return tok


class Tokenizer:
    """``encode(text) -> list[int]``, ``decode(ids) -> str``, ``chat(prompt) -> str``; ``bos``, ``eos``,
    ``stop`` (ids that end generation), ``add_bos``, ``n_vocab``."""

    def __init__(self, tokens, merges, token_types=None, pre="default", *, bos=None, eos=None,
                 stop=(), add_bos=False, chat_template=None, model=BPE_MODEL, scores=None, add_space_prefix=True):
        from tokenizers import AddedToken

        if pre not in PRE_TOKENIZERS:
            raise ValueError(f"tokenizer.ggml.pre = {pre!r} is not supported "
                             f"(supported: {', '.join(PRE_TOKENIZERS)})")
        _check_strings("tokens", tokens)
        _check_strings("merges", merges or [])
        self.n_vocab = len(tokens)
        if not self.n_vocab:
            raise ValueError("the vocabulary is empty")
        if token_types is not None:
            token_types = np.asarray(token_types)
            if token_types.shape != (self.n_vocab,) or not np.issubdtype(token_types.dtype, np.integer):
                raise ValueError(f"token types must be {self.n_vocab} integers (one per token), got "
                                 f"{token_types.dtype} {token_types.shape}")
        for name, i in (("bos", bos), ("eos", eos)):
            if i is not None and (isinstance(i, bool) or not isinstance(i, (int, np.integer))):
                raise ValueError(f"{name} token id {i!r} is not an integer")
            if i is not None and not 0 <= i < self.n_vocab:
                raise ValueError(f"{name} token id {i} is outside the vocabulary [0, {self.n_vocab})")
        if not isinstance(chat_template, (str, type(None))):
            raise ValueError(f"the chat template is a {type(chat_template).__name__}, not text")
        vocab = {}
        for i, t in enumerate(tokens):
            vocab.setdefault(t, i)  # duplicates: the first id, as llama.cpp's token_to_id keeps
        # decode: a later duplicate spells the first's text (the BPE knows only the first id)
        self._canon = np.array([vocab[t] for t in tokens], np.int64)
        if model == BPE_MODEL:
            tok = _byte_level_bpe(vocab, merges, pre)
        elif model == SPM_MODEL:
            tok = _sentencepiece_bpe(tokens, vocab, scores, token_types, add_space_prefix)
        else:
            raise ValueError(f"tokenizer model {model!r} is not supported (gpt2: byte-level BPE; llama: SentencePiece)")
        special = [i for i, t in enumerate(token_types if token_types is not None else ())
                   if int(t) in (TokenType.CONTROL, TokenType.USER_DEFINED)]
        tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in special])
        self._tok = tok
        self._lock = threading.Lock()  # encode_special_tokens is the HF tokenizer's state
        self._specials = {}
        for i in special:
            self._specials.setdefault(tokens[i], i)
        self._special_re = (re.compile("|".join(map(re.escape, sorted(self._specials, key=len, reverse=True))))
                            if self._specials else None)
        self.pre, self.bos, self.eos, self.add_bos = pre, bos, eos, bool(add_bos)
        self.stop = frozenset(int(s) for s in (eos, *stop) if s is not None)
        self.chat_template = chat_template
        self.tokens = tokens

    @classmethod
    def from_model(cls, model) -> "Tokenizer":
        """The tokenizer a loaded ``gguf.Model`` carries, or a GGUFError saying what is missing."""
        if not hasattr(model, "metadata") or not hasattr(model, "metadata_array"):
            raise TypeError(f"Tokenizer.from_model takes a loaded model (hybrid.load), got {type(model).__name__}")
        K, meta = Keys.Tokenizer, model.metadata
        kind = meta.get(K.MODEL)
        if kind is None:
            raise GGUFError(f"{model.path}: the file has no tokenizer ({K.MODEL} is missing); "
                            "pass token ids (--tokens) instead of text")
        if kind not in (BPE_MODEL, SPM_MODEL):
            raise GGUFError(f"{model.path}: {K.MODEL} = {kind!r} is not supported (byte-level BPE 'gpt2' and "
                            "SentencePiece 'llama' only)")
        tokens = model.metadata_array(K.LIST)
        spm = kind == SPM_MODEL
        merges = None if spm else model.metadata_array(K.MERGES)
        scores = model.metadata_array(K.SCORES) if spm else None
        if tokens is None or len(tokens) == 0 or (merges if not spm else scores) is None:
            want = K.LIST if tokens is None or not len(tokens) else (K.SCORES if spm else K.MERGES)
            raise GGUFError(f"{model.path}: {want} is missing or empty")
        types = model.metadata_array(K.TOKEN_TYPE)
        if types is not None and len(types) != len(tokens):
            raise GGUFError(f"{model.path}: {K.TOKEN_TYPE} has {len(types)} entries, {K.LIST} {len(tokens)}")
        emb = model.tensors.get("token_embd.weight")
        if emb is not None and emb.shape[0] != len(tokens):  # llama.cpp sizes token_embd by the vocabulary
            raise GGUFError(f"{model.path}: {K.LIST} has {len(tokens)} tokens, token_embd.weight "
                            f"{emb.shape[0]} rows")
        stop = []
        for k in (K.EOT_ID, K.EOM_ID):  # a BOOL is not an id (True would make token 1 a stop token)
            v = meta.get(k)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < len(tokens)):
                raise GGUFError(f"{model.path}: {k} = {v!r} is not a token id in [0, {len(tokens)})")
            if v is not None:
                stop.append(v)
        add_bos = meta.get(K.ADD_BOS, spm)  # llama.cpp's defaults: BOS for SentencePiece vocabularies
        space = meta.get(K.ADD_PREFIX, True)
        for key, v in ((K.ADD_BOS, add_bos), (K.ADD_PREFIX, space)):
            if not isinstance(v, bool):
                raise GGUFError(f"{model.path}: {key} = {v!r} is not a bool")
        try:
            return cls(tokens, merges, types, meta.get(K.PRE, "default"), bos=meta.get(K.BOS_ID),
                       eos=meta.get(K.EOS_ID), stop=stop, add_bos=add_bos,
                       chat_template=meta.get(K.CHAT_TEMPLATE), model=kind, scores=scores, add_space_prefix=space)
        except ValueError as e:
            raise GGUFError(f"{model.path}: tokenizer: {e}") from None

    def encode(self, text: str, add_bos: bool | None = None, *, special: bool = False) -> list[int]:
        """Token ids of ``text``; control-token text in it is a special token only with ``special``
        (llama.cpp's parse_special), else plain text."""
        if not isinstance(text, str):
            raise TypeError(f"text must be str, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate: undecodable bytes of a command line or file name
            raise ValueError(f"the text is not valid Unicode: {e.object[e.start:e.end]!r} at character "
                             f"{e.start} (undecodable bytes?)") from None
        with self._lock:
            self._tok.encode_special_tokens = not special
            ids = self._tok.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos is not None:
            ids = [self.bos] + ids
        return ids

    def decode(self, ids) -> str:
        if isinstance(ids, (str, bytes)) or not hasattr(ids, "__iter__"):
            raise TypeError(f"ids must be a sequence of token ids, got {type(ids).__name__}")
        ids = list(ids)
        for i in ids:
            if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
                raise TypeError(f"token id {i!r} is not an integer")
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.n_vocab]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {self.n_vocab})")
        return self._tok.decode(self._canon[ids].tolist(), skip_special_tokens=False)

    def chat(self, prompt: str, system: str | None = None, *, timeout: float | None = None) -> str:
        """The prompt as one user message in the file's chat template, ready for the assistant's reply.

        Rendered in jinja2's immutable sandbox in a child process that may take ``timeout``
        seconds (default ``CHAT_TIMEOUT_S``), ``CHAT_MEMORY_BYTES`` of memory and write
        ``CHAT_MAX_CHARS`` characters more than the messages hold; anything the template
        does wrong, or beyond those bounds, is a ValueError."""
        return self.chat_messages(self._messages(prompt, system), timeout=timeout)

    def chat_messages(self, messages: list, *, timeout: float | None = None) -> str:
        """``messages`` (dicts of ``role`` and ``content`` strings, as OpenAI's API takes) in the
        file's chat template, ready for the assistant's reply; bounded as ``chat`` says."""
        return self._render([self._check_messages(messages)], timeout)[0]

    def encode_chat(self, prompt: str, system: str | None = None, *, special: bool = False,
                    timeout: float | None = None) -> tuple[str, list[int]]:
        """The chat prompt's text and token ids (``encode_messages`` of one user message)."""
        return self.encode_messages(self._messages(prompt, system), special=special, timeout=timeout)

    def encode_messages(self, messages: list, *, special: bool = False,
                        timeout: float | None = None) -> tuple[str, list[int]]:
        """The chat's text and token ids. Control tokens are parsed in the template's own text
        only, not in the messages (unless ``special``): the template is rendered a second time
        with a marker for each message, which tells its text from theirs. BOS is added as
        ``add_bos`` says unless the template writes it itself."""
        messages = self._check_messages(messages)
        marks = [f"\ue000{i}\ue001" for i in range(len(messages))]
        if special:
            text = self._render([messages], timeout)[0]
            ids = self.encode(text, add_bos=False, special=True)
        else:
            marked = [dict(m, content=mk) for m, mk in zip(messages, marks)]
            text, text_m = self._render([messages, marked], timeout)
            ids = self._encode_template(text, text_m, messages, marks)
        bos_text = self.tokens[self.bos] if self.bos is not None else None
        if self.add_bos and self.bos is not None and not (bos_text and text.startswith(bos_text)):
            ids = [self.bos] + ids
        return text, ids

    def _encode_template(self, text, text_m, messages, marks) -> list[int]:
        """``text`` tokenized with specials matched only outside the messages, whose places
        ``text_m`` (the render with markers) shows; the text between specials is one piece, so
        the ids are those of the whole text with the messages' control tokens as plain text."""
        parts = re.split("(" + "|".join(map(re.escape, marks)) + ")", text_m)
        if sorted(p for p in parts if p in marks) != sorted(marks) or \
                "".join(messages[marks.index(p)]["content"] if p in marks else p for p in parts) != text:
            raise ValueError("chat template: it changes or repeats the message text, so the template's own "
                             "text cannot be told from the user's; pass special=True (--special) to parse "
                             "control tokens everywhere")
        ids, plain = [], []
        for p in parts:
            if p in marks:
                plain.append(messages[marks.index(p)]["content"])
                continue
            at = 0
            for m in (self._special_re.finditer(p) if self._special_re else ()):
                plain.append(p[at:m.start()])
                ids += self.encode("".join(plain), add_bos=False)
                ids.append(self._specials[m.group()])
                plain, at = [], m.end()
            plain.append(p[at:])
        return ids + self.encode("".join(plain), add_bos=False)

    def _messages(self, prompt, system):
        if not self.chat_template:
            raise ValueError(f"the model has no chat template ({Keys.Tokenizer.CHAT_TEMPLATE})")
        if not isinstance(prompt, str) or not isinstance(system, (str, type(None))):
            bad = prompt if not isinstance(prompt, str) else system
            raise TypeError(f"the prompt and system text must be str, got {type(bad).__name__}")
        return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]

    def _check_messages(self, messages):
        if not self.chat_template:
            raise ValueError(f"the model has no chat template ({Keys.Tokenizer.CHAT_TEMPLATE})")
        if not isinstance(messages, (list, tuple)) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages):
            raise TypeError("messages must be a non-empty list of dicts with str 'role' and 'content'")
        return [dict(m) for m in messages]

    def _render(self, message_lists, timeout) -> list[str]:
        tok = lambda i: self.tokens[i] if i is not None else ""  # noqa: E731
        n_chars = max(sum(len(m["content"]) for m in ms) for ms in message_lists)
        timeout = CHAT_TIMEOUT_S if timeout is None else timeout
        job = dict(template=self.chat_template, memory=CHAT_MEMORY_BYTES, max_chars=CHAT_MAX_CHARS + n_chars * 4,
                   cpu_s=math.ceil(timeout) + 1, parent=os.getpid(), path=_child_path(),
                   contexts=[dict(messages=ms, add_generation_prompt=True, bos_token=tok(self.bos),
                                  eos_token=tok(self.eos)) for ms in message_lists])
        try:  # -I: neither the working directory nor PYTHON* variables reach the child's imports
            p = subprocess.run([sys.executable, "-I", "-c", _RENDER], input=json.dumps(job), capture_output=True,
                               text=True, timeout=timeout, encoding="utf-8", errors="surrogatepass")
        except subprocess.TimeoutExpired:
            raise ValueError(f"chat template: did not finish in {timeout:g} s (a template that loops?)") from None
        except OSError as e:
            raise ValueError(f"chat template: cannot start the renderer: {e}") from None
        try:
            out = json.loads(p.stdout)
        except ValueError:
            raise ValueError(f"chat template: the renderer failed (exit {p.returncode}): "
                             f"{(p.stderr.strip().splitlines() or ['no message'])[-1]}") from None
        if "error" in out:
            raise ValueError(f"chat template: {out['error']}")
        return out["texts"]


def _child_path() -> list[str]:
    """This process's import path without the working directory: where the child finds jinja2
    (a user site, a PYTHONPATH) after its own standard library."""
    cwd = os.path.realpath(os.getcwd())
    return [p for p in sys.path if p and os.path.isabs(p) and os.path.realpath(p) != cwd]


def _check_strings(what, a):
    if not isinstance(a, list) or not all(isinstance(t, str) for t in a):
        kind = getattr(a, "dtype", None) or type(a).__name__
        raise ValueError(f"{what} must be an array of strings, got {kind}")


# The child that renders a chat template: reads a job (JSON) on stdin, writes {"text"} or {"error"}.
_RENDER = r"""
import json, os, resource, signal, sys
job = json.loads(sys.stdin.read())
try:  # die with the parent (Linux): a SIGKILLed CLI must not leave a template rendering
    import ctypes
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
except (OSError, AttributeError):
    pass
if os.getppid() != job["parent"]:  # the parent died before the prctl
    sys.exit(1)
resource.setrlimit(resource.RLIMIT_AS, (job["memory"], job["memory"]))
resource.setrlimit(resource.RLIMIT_CPU, (job["cpu_s"], job["cpu_s"] + 1))  # where no parent-death signal
sys.path.extend(p for p in job["path"] if p not in sys.path)

def main():
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(msg):
        raise TemplateError(msg)

    def strftime_now(fmt):
        import datetime
        return datetime.datetime.now().strftime(fmt)

    # As transformers renders chat templates: loop controls on, blocks trimmed.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
    try:
        template, texts = env.from_string(job["template"]), []
        for context in job["contexts"]:
            parts, n = [], 0
            for part in template.generate(**context):
                n += len(part)
                if n > job["max_chars"]:
                    return {"error": f"renders more than {job['max_chars']:,} characters"}
                parts.append(part)
            texts.append("".join(parts))
        return {"texts": texts}
    except MemoryError:
        return {"error": f"needs more than {job['memory'] >> 20} MiB of memory"}
    except RecursionError:
        return {"error": "recurses too deeply"}
    except Exception as e:  # SecurityError and TemplateError among them: the template's fault
        return {"error": f"{type(e).__name__}: {e}"}

sys.stdout.write(json.dumps(main()))
"""
