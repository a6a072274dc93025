"""Bad files of the new weight types fail with one line naming the tensor, its type and the fault.

A Q4_K-expert, Q6_K-dense model, edited in its header (type id, dims) or data (a NaN/inf
scale), through the CLI: one ``hybrid: error:`` line, never a traceback.
"""
import re

import pytest
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as T

from hybrid.cli import main
from qtypes_models import write_model


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("q") / "q4k.gguf", T.Q4_K, T.Q6_K, seed=3, n_layers=1)


def fails_cleanly(capsys, argv, match):
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    _, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert e.value.code not in (0, None)
    assert len(lines) == 1 and lines[0].startswith("hybrid: error:") and "Traceback" not in err, err
    assert re.search(match, lines[0]), lines[0]
    return lines[0]


def _retype(src, dst, name, new_type):
    """A copy of ``src`` whose tensor ``name`` has GGML type id ``new_type`` in the header."""
    data = bytearray(src.read_bytes())
    key = name.encode()
    at = data.index(len(key).to_bytes(8, "little") + key) + 8 + len(key)
    n_dims = int.from_bytes(data[at:at + 4], "little")
    t_at = at + 4 + 8 * n_dims
    data[t_at:t_at + 4] = int(new_type).to_bytes(4, "little")
    dst.write_bytes(bytes(data))
    return dst


def test_good_file_loads(capsys, good):
    assert main(["info", "-m", str(good), "--check-tensors"]) == 0
    assert "Q4_K" in capsys.readouterr().out


def test_unknown_type_id(capsys, good, tmp_path):
    bad = _retype(good, tmp_path / "u.gguf", "blk.0.ffn_up_exps.weight", 77)
    fails_cleanly(capsys, ["info", "-m", bad], r"'blk\.0\.ffn_up_exps\.weight' has unknown GGML type id 77")


def test_row_not_a_multiple_of_the_block(capsys, good, tmp_path):
    # q_norm rows are head_dim (64) long: not whole Q4_K or IQ2_XXS super-blocks
    for t in (T.Q4_K, T.IQ2_XXS):
        bad = _retype(good, tmp_path / f"r{t.name}.gguf", "blk.0.attn_q_norm.weight", t)
        fails_cleanly(capsys, ["info", "-m", bad],
                      rf"'blk\.0\.attn_q_norm\.weight' \({t.name}\) has rows of 64 elements, "
                      r"not a multiple of the block size 256")


@pytest.mark.parametrize("t", [T.Q5_K, T.Q3_K, T.IQ1_S])
def test_bytes_disagree_with_type_and_shape(capsys, good, tmp_path, t):
    # same elements, another 256-block type: the stored bytes (Q4_K's 144 per block) disagree
    assert GGML_QUANT_SIZES[t][1] != GGML_QUANT_SIZES[T.Q4_K][1]
    bad = _retype(good, tmp_path / "s.gguf", "blk.0.ffn_gate_exps.weight", t)
    fails_cleanly(capsys, ["info", "-m", bad],
                  rf"blk\.0\.ffn_gate_exps\.weight. \({t.name} \[256, 256, 4\]\) do not match its type and shape")


def test_type_gguf_knows_but_nothing_decodes(capsys, good, tmp_path):
    # I32 is in gguf's tables (4 bytes an element, as the F32 stored) but no format decodes it
    bad = _retype(good, tmp_path / "k.gguf", "output_norm.weight", T.I32)  # F32 -> I32: same bytes
    fails_cleanly(capsys, ["run", "-m", bad, "-p", "4", "-ub", "4", "--device", "cpu", "--no-progress"],
                  r"output_norm\.weight.*I32")


@pytest.mark.parametrize("t_name", ["blk.0.ffn_down_exps.weight", "blk.0.attn_k.weight"])
def test_check_tensors_finds_a_nan_scale(capsys, good, tmp_path, edit_tensor, t_name):
    def edit(a):  # the f16 d of row 1's one block (Q4_K: bytes 0-1; Q6_K: 208-209) -> NaN
        at = 0 if "exps" in t_name else 208
        flat = a.reshape(-1, a.shape[-1])
        flat[1, at], flat[1, at + 1] = 0x00, 0x7E
    bad = edit_tensor(good, tmp_path / "n.gguf", t_name, edit)
    assert main(["info", "-m", str(bad)]) == 0  # not part of loading
    capsys.readouterr()
    fails_cleanly(capsys, ["info", "-m", bad, "--check-tensors"],
                  rf"{re.escape(t_name)}.*\((Q4_K|Q6_K)\) holds a NaN or inf block scale at")
