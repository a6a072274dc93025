"""Text <-> token ids from the file's own ``tokenizer.ggml.*`` keys, with HF ``tokenizers``.

gpt2-style byte-level BPE (``tokenizer.ggml.model = gpt2``): vocabulary and
merges from the file, the pre-tokenizer regex that ``tokenizer.ggml.pre`` names
(as llama.cpp's llama-vocab.cpp), control and user-defined tokens as special
tokens (matched in the text, as llama.cpp does for prompts). ``decode(encode(s))
== s`` for any text. The chat template is rendered in jinja2's immutable
sandbox: a template is code from the file's author.
"""
from __future__ import annotations

from gguf.constants import Keys, TokenType

from .gguf import GGUFError

__all__ = ["Tokenizer", "PRE_TOKENIZERS"]

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_O200K = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# tokenizer.ggml.pre -> the split regex llama.cpp uses for it
PRE_TOKENIZERS = {"default": _GPT2, "gpt2": _GPT2, "gpt-4o": _O200K, "qwen2": _QWEN2,
                  "llama-bpe": _LLAMA3, "llama3": _LLAMA3}


class Tokenizer:
    """``encode(text) -> list[int]``, ``decode(ids) -> str``, ``chat(prompt) -> str``; ``bos``, ``eos``,
    ``stop`` (ids that end generation), ``add_bos``, ``n_vocab``."""

    def __init__(self, tokens, merges, token_types=None, pre="default", *, bos=None, eos=None,
                 stop=(), add_bos=False, chat_template=None):
        from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
        from tokenizers import Tokenizer as HFTokenizer

        if pre not in PRE_TOKENIZERS:
            raise ValueError(f"tokenizer.ggml.pre = {pre!r} is not supported "
                             f"(supported: {', '.join(PRE_TOKENIZERS)})")
        self.n_vocab = len(tokens)
        for name, i in (("bos", bos), ("eos", eos)):
            if i is not None and not 0 <= i < self.n_vocab:
                raise ValueError(f"{name} token id {i} is outside the vocabulary [0, {self.n_vocab})")
        vocab = {}
        for i, t in enumerate(tokens):
            vocab.setdefault(t, i)  # duplicates: the first id, as llama.cpp's token_to_id keeps
        pairs = []
        for m in merges:
            a, sep, b = m.partition(" ")
            if not sep:
                raise ValueError(f"merge {m!r} is not two tokens separated by a space")
            pairs.append((a, b))
        tok = HFTokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False))
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(PRE_TOKENIZERS[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.decoder = decoders.ByteLevel()
        special = [i for i, t in enumerate(token_types if token_types is not None else ())
                   if int(t) in (TokenType.CONTROL, TokenType.USER_DEFINED)]
        tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in special])
        self._tok = tok
        self.pre, self.bos, self.eos, self.add_bos = pre, bos, eos, bool(add_bos)
        self.stop = frozenset(int(s) for s in (eos, *stop) if s is not None)
        self.chat_template = chat_template
        self.tokens = tokens

    @classmethod
    def from_model(cls, model) -> "Tokenizer":
        """The tokenizer a loaded ``gguf.Model`` carries, or a GGUFError saying what is missing."""
        K, meta = Keys.Tokenizer, model.metadata
        kind = meta.get(K.MODEL)
        if kind is None:
            raise GGUFError(f"{model.path}: the file has no tokenizer ({K.MODEL} is missing); "
                            "pass token ids (--tokens) instead of text")
        if kind != "gpt2":
            raise GGUFError(f"{model.path}: {K.MODEL} = {kind!r} is not supported (byte-level BPE 'gpt2' only)")
        tokens = model.metadata_array(K.LIST)
        merges = model.metadata_array(K.MERGES)
        if not tokens or merges is None:
            raise GGUFError(f"{model.path}: {K.LIST if not tokens else K.MERGES} is missing")
        types = model.metadata_array(K.TOKEN_TYPE)
        if types is not None and len(types) != len(tokens):
            raise GGUFError(f"{model.path}: {K.TOKEN_TYPE} has {len(types)} entries, {K.LIST} {len(tokens)}")
        stop = [meta[k] for k in (K.EOT_ID, K.EOM_ID) if isinstance(meta.get(k), int)]
        try:
            return cls(tokens, merges, types, meta.get(K.PRE, "default"), bos=meta.get(K.BOS_ID),
                       eos=meta.get(K.EOS_ID), stop=stop, add_bos=meta.get(K.ADD_BOS, False),
                       chat_template=meta.get(K.CHAT_TEMPLATE))
        except ValueError as e:
            raise GGUFError(f"{model.path}: tokenizer: {e}") from None

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be str, got {type(text).__name__}")
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos is not None:
            ids = [self.bos] + ids
        return ids

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.n_vocab]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {self.n_vocab})")
        return self._tok.decode(ids, skip_special_tokens=False)

    def chat(self, prompt: str, system: str | None = None) -> str:
        """The prompt as one user message in the file's chat template, ready for the assistant's reply."""
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        if not self.chat_template:
            raise ValueError(f"the model has no chat template ({Keys.Tokenizer.CHAT_TEMPLATE})")

        def raise_exception(msg):
            raise TemplateError(msg)

        def strftime_now(fmt):
            import datetime
            return datetime.datetime.now().strftime(fmt)

        # As transformers renders chat templates: loop controls on, blocks trimmed.
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        tok = lambda i: self.tokens[i] if i is not None else ""  # noqa: E731
        try:
            return env.from_string(self.chat_template).render(
                messages=messages, add_generation_prompt=True, bos_token=tok(self.bos), eos_token=tok(self.eos))
        except TemplateError as e:  # SecurityError is one: the template tried something unsafe
            raise ValueError(f"chat template: {type(e).__name__}: {e}") from None
