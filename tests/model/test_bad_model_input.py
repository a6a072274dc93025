"""Bad input on the whole model's surfaces: tokenizer keys, chat templates, prompts, context,
sampling options, RoPE keys. Each is a clear error (one ``hybrid: error:`` line, exit 2,
from the command line), never a traceback, a hang or a machine's memory."""
import math
import os
import time

import numpy as np
import pytest
from gguf import GGUFReader, GGUFValueType as V, GGUFWriter

from hybrid.cli import run as cli_run  # the run command: its limits and its imports are patched here
from hybrid.cli import main
from hybrid.model import GGUFError, load, write_tiny
from hybrid.model import tokenizer as tokmod
from hybrid.model.config import read_config
from hybrid.model.forward import Transformer
from hybrid.model.generate import generate, sample
from hybrid.model.tokenizer import Tokenizer

SHAPE = dict(n_layers=2, n_embd=32, n_ff=32, n_experts=4, k=2, n_head=1, n_head_kv=1, head_dim=32, n_swa=8)


@pytest.fixture(scope="module")
def talker(tmp_path_factory):
    return write_tiny(tmp_path_factory.mktemp("m") / "talker.gguf", **SHAPE, n_vocab=300, seed=2)


def rewrite(src, dst, set=None, drop=()):
    """A copy of ``src`` with metadata keys set (key: (value, type[, item type])) or dropped."""
    set = dict(set or {})
    r = GGUFReader(src)
    w = GGUFWriter(dst, r.fields["general.architecture"].contents())
    for name, f in r.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture" or name in drop or name in set:
            continue
        w.add_key_value(name, f.contents(), f.types[0], sub_type=f.types[-1] if f.types[0] == V.ARRAY else None)
    for name, (value, vtype, *sub) in set.items():
        w.add_key_value(name, value, vtype, sub_type=sub[0] if sub else None)
    for t in r.tensors:
        w.add_tensor(t.name, np.ascontiguousarray(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def fails(capsys, *argv, match=""):
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("hybrid: error:"), err
    assert match.lower() in lines[0].lower(), lines[0]
    return lines[0]


RUN = ["--no-progress", "-n", "0"]


# ------------------------------------------------------------------ tokenizer keys

def test_tokenizer_keys_of_the_wrong_type_or_size(capsys, talker, tmp_path):
    tokens = load(talker).metadata_array("tokenizer.ggml.tokens")
    cases = {
        "tokens are numbers": ({"tokenizer.ggml.tokens": (list(range(300)), V.ARRAY, V.INT32)}, "array of strings"),
        "merges are numbers": ({"tokenizer.ggml.merges": ([1, 2, 3], V.ARRAY, V.INT32)}, "array of strings"),
        "merge of unknown tokens": ({"tokenizer.ggml.merges": (["zzzq qqqz"], V.ARRAY, V.STRING)},
                                    "out of vocabulary"),
        "bos is text": ({"tokenizer.ggml.bos_token_id": ("1", V.STRING)}, "not an integer"),
        "bos is a float": ({"tokenizer.ggml.bos_token_id": (1.5, V.FLOAT32)}, "not an integer"),
        "add_bos is text": ({"tokenizer.ggml.add_bos_token": ("yes", V.STRING)}, "not a bool"),
        "template is a number": ({"tokenizer.chat_template": (5, V.UINT32)}, "chat template is a int"),
        "no byte tokens": ({"tokenizer.ggml.tokens": ([f"t{i}" for i in range(300)], V.ARRAY, V.STRING),
                            "tokenizer.ggml.merges": (["t t"], V.ARRAY, V.STRING)}, "byte tokens"),
        "vocabulary shorter than token_embd": ({"tokenizer.ggml.tokens": (tokens[:290], V.ARRAY, V.STRING),
                                                "tokenizer.ggml.token_type": ([1] * 290, V.ARRAY, V.INT32)},
                                               "290 tokens, token_embd.weight 300 rows"),
    }
    for name, (keys, match) in cases.items():
        path = rewrite(talker, tmp_path / "t.gguf", set=keys)
        with pytest.raises(GGUFError, match=match):
            Tokenizer.from_model(load(path))
        fails(capsys, "run", "-m", path, "--prompt", "hi", *RUN, match=match)
        assert main(["info", "-m", str(path)]) == 0, name  # info says so, no traceback
        assert "tokenizer: none usable" in capsys.readouterr().out


# ------------------------------------------------------------------ chat templates

@pytest.mark.parametrize("template, match", [
    ("{{ 1/0 }}", "ZeroDivisionError"),
    ("{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}", "recurses too deeply"),
    ("{{ 'x' * 10**10 }}", "MiB of memory"),  # 10 GB in one string
    ("{% for i in range(100000) %}{{ 'x' * 100000 }}{% endfor %}", "renders more than"),  # 10 GB in pieces
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "did not finish in 1 s"),
])
def test_chat_templates_are_bounded_in_time_memory_and_size(capsys, talker, tmp_path, monkeypatch, template, match):
    monkeypatch.setattr(tokmod, "CHAT_TIMEOUT_S", 1.0)
    path = rewrite(talker, tmp_path / "t.gguf", set={"tokenizer.chat_template": (template, V.STRING)})
    t0 = time.perf_counter()
    fails(capsys, "run", "-m", path, "--chat", "--prompt", "hi", *RUN, match=match)
    assert time.perf_counter() - t0 < 30


def test_chat_needs_text_and_text_must_be_unicode(capsys, talker):
    fails(capsys, "run", "-m", talker, "--chat", "--tokens", "1,2", *RUN, match="--chat wraps a text prompt")
    fails(capsys, "run", "-m", talker, "--chat", "-p", "4", *RUN, match="--chat wraps a text prompt")
    # an argument of undecodable bytes arrives as lone surrogates (os.fsdecode)
    fails(capsys, "run", "-m", talker, "--prompt", "hi \udcff", *RUN, match="not valid Unicode")
    with pytest.raises(ValueError, match="not valid Unicode"):
        Tokenizer.from_model(load(talker)).encode("\ud800")


# ------------------------------------------------------------------ prompt files, logits file

def test_prompt_files_that_never_end_or_are_too_large(capsys, talker, tmp_path, monkeypatch):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # opening it would wait for a writer forever
    fails(capsys, "run", "-m", talker, "-f", fifo, *RUN, match="not a regular file")
    if os.path.exists("/dev/zero"):  # reading it would fill the memory
        fails(capsys, "run", "-m", talker, "-f", "/dev/zero", *RUN, match="not a regular file")
    big = tmp_path / "big.txt"
    big.write_text("word " * 100)
    monkeypatch.setattr(cli_run, "MAX_PROMPT_BYTES", 64)
    fails(capsys, "run", "-m", talker, "-f", big, *RUN, match="more than the 64 bytes")


def test_logits_out_is_checked_before_the_run(capsys, talker, tmp_path):
    # checked before the model is even opened: the missing model is not what is reported
    fails(capsys, "run", "-m", tmp_path / "missing.gguf", "--tokens", "1", "--logits-out",
          tmp_path / "no" / "l.npy", match="--logits-out: cannot write")
    fails(capsys, "run", "-m", talker, "--tokens", "1", "--logits-out", "", match="empty file name")
    (tmp_path / "d.npy").mkdir()
    fails(capsys, "run", "-m", talker, "--tokens", "1", "--logits-out", tmp_path / "d.npy", match="is a directory")
    assert main(["run", "-m", str(talker), "--tokens", "1,2", *RUN, "--logits-out", str(tmp_path / "l")]) == 0
    assert f"prompt logits: {tmp_path / 'l.npy'}" in capsys.readouterr().out  # the file np.save wrote
    assert np.load(tmp_path / "l.npy").shape == (2, 300)


# ------------------------------------------------------------------ context and memory

def test_context_beyond_memory_is_refused_naming_the_bytes(capsys, talker, monkeypatch, tmp_path):
    fails(capsys, "run", "-m", talker, "--tokens", "1,2", *RUN, "-c", 10**12, match="KV cache of")
    fails(capsys, "run", "-m", talker, "--tokens", "1,2", "--no-progress", "-n", 10**12, match="bytes")
    fails(capsys, "bench", "-m", talker, "-p", 8, "-ub", 8, "-n", 10**12, match="-n: 1,000,000,000,000 tokens, more than")
    with pytest.raises(ValueError, match=r"KV cache of .* bytes\), more than"):
        Transformer(load(talker), n_ctx=10**12)
    monkeypatch.setattr(cli_run, "physical_memory", lambda: 1000)
    fails(capsys, "run", "-m", talker, "--tokens", "1,2", *RUN, "--logits-out", tmp_path / "l.npy",
          match="--logits-out: the logits of 2 prompt tokens take 0.0 GiB (2,400 bytes)")
    assert not (tmp_path / "l.npy").exists()


def test_a_prompt_longer_than_the_context_fails_before_the_warm_up(capsys, talker, monkeypatch):
    def no_warm_up(tr):
        raise AssertionError("warm-up ran")
    monkeypatch.setattr(cli_run, "warm_up_model", no_warm_up)  # the warm-up now lives in hybrid.bench
    fails(capsys, "run", "-m", talker, "--tokens", "1,2,3", "-c", 2, *RUN, match="exceed the context of 2")


# ------------------------------------------------------------------ sampling options

def test_sampling_options_are_checked_before_the_prompt_runs(talker):
    tr = Transformer(load(talker), n_ctx=8)

    def no_prefill(*a, **k):
        raise AssertionError("the prompt ran")
    tr.prefill = no_prefill
    for kw, match in ((dict(temp=1.0, top_p=0.0), "top_p"), (dict(temp=1.0, top_p=float("nan")), "top_p"),
                      (dict(temp=float("inf")), "temp"), (dict(temp=float("nan")), "temp")):
        with pytest.raises(ValueError, match=match):
            generate(tr, [1, 2], 2, **kw)


def test_a_tiny_temperature_is_not_nan():
    logits = np.array([30.0, 29.0, -5.0], np.float32)
    assert sample(logits, 1e-308, 1.0, np.random.default_rng(0)) == 0  # was: probabilities contain NaN


# ------------------------------------------------------------------ RoPE / YaRN keys

@pytest.mark.parametrize("key, value, match", [
    ("gpt-oss.rope.freq_base", 1.0, "greater than 1.0"),  # log(base) = 0 in the YaRN corr dims
    ("gpt-oss.rope.freq_base", 0.5, "greater than 1.0"),
    ("gpt-oss.rope.scaling.yarn_beta_fast", 0.0, "greater than 0.0"),  # division by zero
    ("gpt-oss.rope.scaling.yarn_beta_slow", -1.0, "greater than 0.0"),  # log of a negative
])
def test_rope_keys_the_formulas_cannot_take(talker, key, value, match):
    m = load(talker)
    m.metadata[key] = value
    with pytest.raises(GGUFError, match=match):
        read_config(m)


# ------------------------------------------------------------------ the printed text

def test_the_printed_text_is_every_generated_token(capsys, talker, monkeypatch):
    """Tokens that end inside a UTF-8 character wait for the next one; at the end of the
    generation they must still be printed (they were dropped)."""
    import sys
    gen_mod = sys.modules["hybrid.model.generate"]  # (hybrid.model.generate is also the function's name)
    tok = Tokenizer.from_model(load(talker))
    lead = tok.tokens.index("\u00e6")  # the byte 0xE6: the first of three of a CJK character
    real = gen_mod.generate

    def generate_ending_mid_character(*a, on_token=None, **k):
        g = real(*a, on_token=on_token, **k)
        g.tokens.append(lead)
        on_token(lead)
        return g
    monkeypatch.setattr(gen_mod, "generate", generate_ending_mid_character)
    assert main(["run", "-m", str(talker), "--prompt", "Why is the sky", "-n", "3", "--no-progress"]) == 0
    out = capsys.readouterr().out
    printed = out.split("):\n", 1)[1].split("\n[", 1)[0]
    g_tokens = int(out.split("\n[", 1)[1].split(" tokens")[0])
    assert g_tokens == 4 and printed.endswith("\ufffd")


# ------------------------------------------------------------------ 64-bit key forms, in the file

@pytest.mark.parametrize("key, value, vtype, match", [
    ("gpt-oss.rope.scaling.factor", 5e-324, V.FLOAT64, "RoPE/YaRN keys"),  # was: math domain error
    ("gpt-oss.rope.scaling.factor", math.exp(-10), V.FLOAT64, "RoPE/YaRN keys"),  # was: ZeroDivisionError
    ("gpt-oss.rope.scaling.yarn_log_multiplier", "zero mscale", V.FLOAT64, "RoPE/YaRN keys"),  # ZeroDivisionError
    ("gpt-oss.rope.scaling.yarn_beta_fast", 5e-324, V.FLOAT64, "RoPE/YaRN keys"),  # was: OverflowError
    ("gpt-oss.attention.sliding_window", 2**63, V.UINT64, "out of range"),  # was: OverflowError in ops.py
    ("gpt-oss.context_length", 2**64 - 1, V.UINT64, "out of range"),
    ("gpt-oss.block_count", 2**63, V.UINT64, "blk."),  # the loader: no such blocks
])
def test_float64_and_uint64_key_forms_are_one_clean_line(capsys, talker, tmp_path, key, value, vtype, match):
    if value == "zero mscale":  # 0.1 * m * ln(factor) + 1 == 0
        value = -10.0 / math.log(load(talker).metadata["gpt-oss.rope.scaling.factor"])
    bad = rewrite(talker, tmp_path / "wide.gguf", set={key: (value, vtype)})
    with pytest.raises(GGUFError, match=match):
        read_config(load(bad))
    fails(capsys, "run", "-m", bad, "--tokens", "1,2", *RUN, match=match)


@pytest.mark.parametrize("value, vtype", [(True, V.BOOL), (2**63, V.UINT64), (1.0, V.FLOAT64), (-1, V.INT64)])
def test_stop_token_ids_of_any_other_form_are_refused(capsys, talker, tmp_path, value, vtype):
    bad = rewrite(talker, tmp_path / "eot.gguf", set={"tokenizer.ggml.eot_token_id": (value, vtype)})
    with pytest.raises(GGUFError, match="eot_token_id"):
        Tokenizer.from_model(load(bad))
    fails(capsys, "run", "-m", bad, "--prompt", "hi", *RUN, match="eot_token_id")
