"""Bit-exactness check across two checkouts: logits of tiny models through the public API.

A refactor must not change a result by a bit. From each checkout's root:
    PYTHONPATH=. python examples/bitcheck.py OUT.npz         (NUMBA_ENABLE_CUDASIM=1 adds device runs, ~8 min)
    python examples/bitcheck.py --compare BEFORE.npz AFTER.npz
Uses only the public API (hybrid.load, write_tiny, Transformer, HybridMoE), so an older
checkout writes the same arrays.
"""
import os
import sys
import tempfile

import numpy as np

def capture(out):
    from gguf.constants import GGMLQuantizationType as T
    import hybrid
    from hybrid.model import write_tiny, Transformer
    from hybrid.moe.scheduler import HybridMoE
    res = {}
    d = tempfile.mkdtemp()
    cases = [
        ("gptoss_mxfp4", dict(arch="gpt-oss")),
        ("gptoss_q8", dict(arch="gpt-oss", expert_type=T.Q8_0, seed=1)),
        ("gptoss_f16", dict(arch="gpt-oss", expert_type=T.F16, dense_type=T.F16, seed=2)),
        ("qwen3_q8", dict(arch="qwen3moe", seed=3)),
        ("qwen3_bf16", dict(arch="qwen3moe", expert_type=T.BF16, dense_type=T.BF16, seed=4)),
    ]
    rng = np.random.default_rng(0)
    for name, kw in cases:
        p = write_tiny(os.path.join(d, name + ".gguf"), n_layers=2, **kw)
        m = hybrid.load(p)
        toks = [int(t) for t in rng.integers(0, 1000, 45)]
        for ub in (7, 64):
            tr = Transformer(m, n_ctx=128, n_ubatch=ub)
            res[f"{name}_prefill_ub{ub}"] = tr.prefill(toks[:40], logits="all")
        tr = Transformer(m, n_ctx=128)
        tr.prefill(toks[:40], logits="last")
        res[f"{name}_decode"] = np.stack([tr.decode_one_token(t) for t in toks[40:45]])
        tr = Transformer(m, n_ctx=128, f32=True)
        tr.prefill(toks[:40], logits="last")
        res[f"{name}_decode_f32"] = np.stack([tr.decode_one_token(t) for t in toks[40:42]])
        if name in ("gptoss_mxfp4", "qwen3_q8") and os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
            from hybrid.model.tiny import simulator_tiles
            t = simulator_tiles()
            moe = HybridMoE(m.layers, device="sim", tiles=t.moe, dense_tiles=t.dense)
            tr = Transformer(m, moe, n_ctx=64, n_ubatch=40, dense_tiles=t.dense, attention_config=t.attention)
            res[f"{name}_sim_prefill"] = np.asarray(tr.prefill(toks[:34], logits="all"))
    np.savez(out, **res)
    print("wrote", out, len(res), "arrays")

def compare(a, b):
    A, B = np.load(a), np.load(b)
    bad = 0
    for k in sorted(set(A) | set(B)):
        if (k not in A or k not in B) and "_sim_" in k and os.environ.get("NUMBA_ENABLE_CUDASIM") != "1":
            continue  # simulator entries (~8 min to make) only compared when the simulator is on
        if k not in A or k not in B:
            print("missing", k); bad += 1; continue
        same = A[k].shape == B[k].shape and np.array_equal(A[k].view(np.uint32), B[k].view(np.uint32))
        if not same:
            bad += 1
            print("DIFF", k, A[k].shape, B[k].shape, np.max(np.abs(A[k] - B[k])) if A[k].shape == B[k].shape else "")
    print("bit-identical" if not bad else f"{bad} differ", f"({len(A)} arrays)")
    return bad

if __name__ == "__main__":
    if sys.argv[1] == "--compare":
        sys.exit(1 if compare(sys.argv[2], sys.argv[3]) else 0)
    capture(sys.argv[1])
