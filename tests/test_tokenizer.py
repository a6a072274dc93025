"""The tokenizer built from a file's tokenizer.ggml.* keys, and the chat template's sandbox."""
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from hybrid.model import load, write_tiny
from hybrid.model.gguf import GGUFError
from hybrid.model.tiny import TINY_SPECIALS, tiny_vocab
from hybrid.model.tokenizer import PRE_TOKENIZERS, Tokenizer


@pytest.fixture(scope="module", params=["gpt-oss", "qwen3moe", "llama-spm"])
def model(request, tmp_path_factory):
    # llama-spm: a SentencePiece vocabulary (tokenizer.ggml.model = llama), as Mixtral files hold
    arch, spm = request.param.removesuffix("-spm"), request.param.endswith("-spm")
    path = write_tiny(tmp_path_factory.mktemp("t") / "m.gguf", arch=arch, n_layers=1, n_embd=32,
                      n_ff=32, n_experts=4, k=2, n_head=1, n_head_kv=1, head_dim=32, n_vocab=700,
                      tokenizer="spm" if spm else None)
    return load(path)


@pytest.fixture(scope="module")
def tok(model):
    return Tokenizer.from_model(model)


def test_vocabulary_comes_from_the_file(model, tok):
    # The lists are longer than Model.metadata parses; metadata_array reads them from the map.
    assert model.metadata_array_lengths["tokenizer.ggml.tokens"] == 700 == tok.n_vocab
    assert tok.tokens[tok.eos] == "<|return|>" and tok.tokens[tok.bos] == "<|start|>"
    assert tok.stop == {tok.eos, tok.tokens.index("<|end|>")}
    if model.metadata["tokenizer.ggml.model"] == "llama":
        assert len(model.metadata_array("tokenizer.ggml.scores")) == 700 and tok.tokens[1] == "<0x00>"
    else:
        assert tok.pre == {"gpt-oss": "gpt-4o", "qwen3moe": "qwen2"}[model.arch]
        assert len(model.metadata_array("tokenizer.ggml.merges")) > 100


def test_merges_make_words_and_specials_are_one_token(tok):
    ids = tok.encode("The sky is blue")
    assert len(ids) <= 4  # whole words from the trained merges, not bytes
    s = tok.encode("a<|start|>b", special=True)  # parsed only when asked (llama.cpp parse_special)
    assert tok.tokens.index("<|start|>") not in tok.encode("a<|start|>b")
    assert tok.tokens.index("<|start|>") in s and len(s) == 3


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=60) | st.lists(st.sampled_from(["The", " sky", "\n", " ", "<|end|>", "é", "日本",
                                                             "'s", "123", "\r\n", "🙂"])).map("".join))
def test_round_trip_any_text(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < tok.n_vocab for i in ids)
    assert tok.decode(ids) == text


@pytest.mark.parametrize("pre", sorted(PRE_TOKENIZERS))
def test_every_pre_tokenizer_round_trips(pre):
    tokens, merges, types = tiny_vocab(300, "gpt-4o")
    t = Tokenizer(tokens, merges, types, pre)
    s = "Hello, World! It's 2048 tokens\n\n  of  text\t— ünïcode 😀"
    assert t.decode(t.encode(s)) == s


def test_pre_tokenizer_splits_as_named():
    tokens, merges, types = tiny_vocab(300, "gpt-4o")
    by = lambda pre: Tokenizer(tokens, merges, types, pre)._tok.pre_tokenizer.pre_tokenize_str  # noqa: E731
    assert [w for w, _ in by("gpt-2")("12345 ab")] == ["12345", "Ġab"]
    assert [w for w, _ in by("qwen2")("12345")] == ["1", "2", "3", "4", "5"]
    assert [w for w, _ in by("gpt-4o")("12345 HelloWorld")] == ["123", "45", "ĠHello", "World"]
    # DeepSeek's splits run in turn: digits by three, then CJK runs, then words and punctuation
    assert [w for w, _ in by("deepseek-v3")("1234567 日本語abc, x")] == ["123", "456", "7", "Ġ", "æĹ¥æľ¬èªŀ",
                                                                            "abc", ",", "Ġx"]
    assert [w for w, _ in by("deepseek-llm")("ab 12\ncd")] == ["ab", "Ġ", "12", "Ċ", "cd"]


def test_ignore_merges_takes_a_whole_token_as_it_is():
    # llama.cpp's llama3 and glm4 vocabularies: a piece that is a token is that token, even when
    # the merges cannot build it (here: no merge makes "ab" from "a" "b")
    from tokenizers.pre_tokenizers import ByteLevel
    tokens = sorted(ByteLevel.alphabet()) + ["ab"]
    for pre, whole in (("glm4", True), ("llama-bpe", True), ("qwen2", False)):
        ids = Tokenizer(tokens, [], None, pre).encode("ab")
        assert ids == ([len(tokens) - 1] if whole else [tokens.index("a"), tokens.index("b")]), pre


def test_unknown_pre_tokenizer_and_bad_ids():
    tokens, merges, types = tiny_vocab(300, "gpt-4o")
    with pytest.raises(ValueError, match="'falcon' is not supported"):
        Tokenizer(tokens, merges, types, "falcon")
    t = Tokenizer(tokens, merges, types, "gpt-2")
    with pytest.raises(ValueError, match="300 is outside"):
        t.decode([1, 300])
    with pytest.raises(ValueError, match="bos token id 999"):
        Tokenizer(tokens, merges, types, "gpt-2", bos=999)


def test_a_file_without_a_tokenizer(tmp_path):
    m = load(write_tiny(tmp_path / "m.gguf", n_layers=1, n_embd=32, n_ff=32, n_experts=4, k=2, n_head=1,
                        n_head_kv=1, head_dim=32, n_vocab=16))
    with pytest.raises(GGUFError, match="no tokenizer.*--tokens"):
        Tokenizer.from_model(m)
    m.metadata["tokenizer.ggml.model"] = "bert"
    with pytest.raises(GGUFError, match="'bert' is not supported"):
        Tokenizer.from_model(m)
    m.metadata["tokenizer.ggml.model"] = "llama"  # SentencePiece: needs tokens and scores
    with pytest.raises(GGUFError, match="tokenizer.ggml.tokens is missing"):
        Tokenizer.from_model(m)


def test_chat_template(tok):
    text = tok.chat("Why?")
    assert text == "<|start|>user<|message|>Why?<|end|><|start|>assistant<|message|>"
    assert tok.encode(text, special=True)[0] == tok.tokens.index("<|start|>")


def test_chat_template_features_real_templates_use():
    tokens, merges, types = tiny_vocab(300, "gpt-4o")
    tpl = ("{%- for m in messages %}{% if m.role == 'user' %}{{ m.content | tojson }}{% break %}{% endif %}"
           "{% endfor %}{{ strftime_now('%Y') | length }}{% if not add_generation_prompt %}"
           "{{ raise_exception('no') }}{% endif %}")
    assert Tokenizer(tokens, merges, types, "gpt-2", chat_template=tpl).chat("hi") == '"hi"4'
    t = Tokenizer(tokens, merges, types, "gpt-2", chat_template="{{ raise_exception('bad role') }}")
    with pytest.raises(ValueError, match="bad role"):
        t.chat("hi")


@pytest.mark.parametrize("template", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",  # the CVE-2024-34359 route
    "{% set x = [] %}{{ x.append(1) }}",  # the immutable sandbox: no mutation either
])
def test_chat_template_is_sandboxed(template):
    tokens, merges, types = tiny_vocab(300, "gpt-4o")
    t = Tokenizer(tokens, merges, types, "gpt-2", chat_template=template)
    with pytest.raises(ValueError, match="SecurityError"):
        t.chat("hi")


def test_tiny_vocab_is_deterministic():
    a = tiny_vocab(400)
    assert a == tiny_vocab(400)
    assert a[0][-len(TINY_SPECIALS):] == list(TINY_SPECIALS) or "<|reserved_0|>" in a[0]
    assert a[0][:256] == tiny_vocab(300)[0][:256]  # the 256 byte tokens first


def test_sentencepiece_bytes_spaces_and_bad_vocabularies():
    from hybrid.model.tiny import spm_vocab
    tokens, scores, types = spm_vocab(600)
    t = Tokenizer(tokens, None, types, model="llama", scores=scores)
    ids = t.encode("sky 模")  # "模" is not a piece: its three UTF-8 bytes are byte tokens
    assert [t.tokens[i] for i in ids[-3:]] == ["<0xE6>", "<0xA8>", "<0xA1>"]
    assert t.tokens[ids[0]].startswith("\u2581")  # the space SentencePiece puts before the text
    assert t.decode(ids) == "sky 模"
    no_prefix = Tokenizer(tokens, None, types, model="llama", scores=scores, add_space_prefix=False)
    assert not no_prefix.tokens[no_prefix.encode("sky")[0]].startswith("\u2581")
    with pytest.raises(ValueError, match="one score per token"):
        Tokenizer(tokens, None, types, model="llama", scores=scores[:-1])
    with pytest.raises(ValueError, match="lacks 1 of the 256 byte tokens .*<0x41>"):
        Tokenizer([x if x != "<0x41>" else "A_" for x in tokens], None, types, model="llama", scores=scores)
    with pytest.raises(ValueError, match="tokenizer model 'bert' is not supported"):
        Tokenizer(tokens, None, types, model="bert", scores=scores)
