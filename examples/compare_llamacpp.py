"""Our prompt logits against llama.cpp's, token for token, on one GGUF file.

Build the helper once against a llama.cpp build (include dirs and libllama from
its build tree; llama-cpp-python's sdist vendors one):

    L=path/to/llama.cpp
    g++ -O1 -std=c++17 examples/llamacpp/logits.cpp -I$L/include -I$L/ggml/include \\
        -L$L/build/bin -lllama -lggml -lggml-base -Wl,-rpath,$L/build/bin -o /tmp/llamacpp-logits

then  F32KV=1 python examples/compare_llamacpp.py /tmp/llamacpp-logits model.gguf [n_tokens] [ubatch]

llama.cpp's CPU matmuls round activations (to F16 for F16 weights, to Q8_0 for
quantised ones) and its default KV cache is F16, so only F32 weights with
F32KV=1 compare at float32 precision; other files differ by those roundings.
"""
import subprocess
import sys

import numpy as np

from hybrid.model import load
from hybrid.model.forward import Transformer
from hybrid.model.tokenizer import Tokenizer

TEXT = ("Why is the sky blue? Light from the sun holds every colour, and the air scatters the short wavelengths "
        "more than the long ones. At sunset the light travels through more air, so the blue is scattered away. ")


def main(binary, path, n=300, ub=128):
    model = load(path)
    ids = Tokenizer.from_model(model).encode(TEXT * 20)[:int(n)]
    n_ctx = max(512, len(ids))
    r = subprocess.run([binary, str(path), str(n_ctx), str(ub), ",".join(map(str, ids))], capture_output=True)
    if r.returncode:
        sys.exit(f"llama.cpp failed ({r.returncode}): {r.stderr.decode(errors='replace')[-1500:]}")
    theirs = np.frombuffer(r.stdout, np.float32).reshape(len(ids), -1)
    ours = Transformer(model, n_ctx=n_ctx, n_ubatch=int(ub)).prefill(ids)
    d = np.abs(ours.astype(np.float64) - theirs)
    scale = np.abs(theirs).max()
    print(f"{path}: {len(ids)} tokens, ubatch {ub}, n_vocab {theirs.shape[1]}")
    print(f"max |ours - llama.cpp| = {d.max():.3g} ({d.max() / scale:.2g} of the largest logit {scale:.3g}); "
          f"greedy token agrees at {np.mean(ours.argmax(1) == theirs.argmax(1)) * 100:.1f}% of positions")


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(*sys.argv[1:])
