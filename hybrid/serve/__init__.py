"""``python -m hybrid serve``: an OpenAI-compatible HTTP server over one loaded model.

    python -m hybrid serve -m gpt-oss-20b-mxfp4.gguf --port 8080 [--api-key KEY]

Loads the model once, compiles the kernels (a prompt ubatch and a decode step), then
serves ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models`` and
``GET /health`` on Starlette and uvicorn (the ``serve`` extra). One worker thread owns
the model (``engine``); requests queue in order; ``protocol`` is the wire format.

``add_arguments(parser)`` and ``main(args)`` are what the command line registers; this
module imports without the extra installed, and ``main`` says how to install it.
"""
from __future__ import annotations

import argparse
import logging
import os
import socket
import sys

HELP = "an OpenAI-compatible HTTP server over one loaded model (needs the serve extra)"
INSTALL_HINT = "pip install 'hybrid-moe[serve]'"
DEFAULT_CTX = 4096  # -c 0: the training context, at most this (a KV cache of 128k positions is GiBs)


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``serve``'s flags: where to listen, and ``run``'s flags that build the model (same names and
    meaning; the host-memory mode, ``run``'s ``--host``, is ``--host-memory`` here)."""
    from ..cli.common import checked_type, int_type as _int_type, mb_type as _mb  # the types run's flags use
    from ..moe.copyplan import LAYOUTS
    from ..moe.scheduler import DEVICES, MIN_OFFLOAD_BATCH, POLICIES
    from ..moe.transfer import HOST_MODES
    pos, nonneg = _int_type(1), _int_type(0)
    p.add_argument("-m", "--model", help="GGUF file, or the first part of a split model "
                   "(default: the built-in tiny gpt-oss)")
    p.add_argument("--host", dest="bind", default="127.0.0.1", metavar="ADDR",
                   help="address to listen on (default 127.0.0.1: this machine only)")
    port = checked_type(int, lambda v: 0 <= v <= 65535, "a port number",
                        lambda v, s: f"{v} is not a port number (0 to 65535)")
    p.add_argument("--port", type=port, default=8080, help="TCP port (default 8080; 0: any free one)")
    p.add_argument("--api-key", default=os.environ.get("HYBRID_API_KEY"), metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on every route but /health "
                        "(default: $HYBRID_API_KEY, else none)")
    p.add_argument("--alias", help="the model's id in the API (default: the file's name without .gguf)")
    p.add_argument("-c", "--ctx-size", type=nonneg, default=0,
                   help=f"context size: prompt + generated tokens of one request (default: the training "
                        f"context, at most {DEFAULT_CTX})")
    p.add_argument("-b", "--batch-size", type=pos, default=2048, help="logical batch (default 2048)")
    p.add_argument("-ub", "--ubatch-size", type=pos, default=512, help="ubatch size (tokens, default 512)")
    p.add_argument("--no-prompt-cache", action="store_true",
                   help="run every prompt whole (default: reuse the KV cache of a common prefix)")
    p.add_argument("--max-queue", type=pos, default=64, help="requests waiting beyond this get a 503 (default 64)")
    p.add_argument("--device", default="auto", choices=DEVICES,
                   help="auto: cuda when a GPU is present, else cpu (sim needs NUMBA_ENABLE_CUDASIM=1)")
    p.add_argument("--host-memory", dest="host", default="auto", choices=HOST_MODES,
                   help="host memory for the copies (auto: pinned, else staged; run's --host)")
    p.add_argument("--min-offload-batch", type=nonneg, default=MIN_OFFLOAD_BATCH,
                   help="smaller batches run on the CPU (llama.cpp: 32)")
    p.add_argument("-t", "--threads", type=pos, default=None,
                   help="CPU threads of the Numba kernels (default: all cores); BLAS gets one")
    p.add_argument("--f32", "--f32-decode", dest="f32", action="store_true",
                   help="the experts multiply float32 activations in every call (default: int8 blocks for "
                   "experts with few tokens, as llama.cpp does for all); decoded positions are then reused "
                   "by the prompt cache too")
    p.add_argument("--policy", default="used", choices=POLICIES, help="copy every expert or only the used ones")
    p.add_argument("--layout", default="natural", choices=LAYOUTS, help="device slot = expert id or packed")
    p.add_argument("--cache-mb", type=_mb, default=0.0, help="VRAM cache for experts across ubatches (MiB)")
    p.add_argument("--device-mb", type=_mb, default=None, help="bound on the expert slots in VRAM (MiB)")
    p.add_argument("--no-overlap", action="store_true", help="copy everything, then compute")
    p.add_argument("--check-tensors", action="store_true", help="scan every tensor's data at load")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"),
                   help="server log (default info: one line per request)")
    return p


def _imports():
    try:
        import starlette  # noqa: F401
        import uvicorn
    except ImportError as e:
        from ..cli.common import CLIError
        raise CLIError(f"serve needs Starlette and uvicorn ({e.name} is missing): {INSTALL_HINT}") from None
    return uvicorn


def bind(host: str, port: int) -> socket.socket:
    """The server's socket, bound before the model loads (a taken port fails at once) and
    listening only once the model is warm: until then a client is refused, not left hanging."""
    from ..cli.common import CLIError
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, _, _, _, addr = info[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
    except OSError as e:
        raise CLIError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def build(args):
    """Model, tokenizer and Transformer from the flags (``run``'s code), then the Engine."""
    from ..cli import common as cli
    from ..cli.run import run_transformer
    from ..model.config import read_config
    from .engine import Engine
    model = cli.open_model(args.model, args.check_tensors)
    tok = cli.open_tokenizer(model, needed=True)
    n_ctx = args.ctx_size
    if not n_ctx:
        try:
            n_ctx = min(read_config(model).n_ctx_train, DEFAULT_CTX)
        except Exception as e:  # GGUFError: the whole model cannot run
            raise cli.CLIError(f"bad model: {e}") from None
    tr = run_transformer(model, args, n_ctx)
    return model, tok, Engine(tr, tok, threads=args.threads, prompt_cache=not args.no_prompt_cache,
                              max_queue=args.max_queue)


def main(args) -> int:
    """Serve until SIGINT/SIGTERM; user errors are ``cli.CLIError`` (``hybrid.cli.main`` prints them)."""
    from ..cli import common as cli
    uvicorn = _imports()
    from .app import create_app
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s: %(message)s",
                        stream=sys.stderr)
    cli.set_threads(args.threads)
    sock = bind(args.bind, args.port)
    try:
        model, tok, engine = build(args)
        model_id = args.alias or model.path.name.removesuffix(".gguf")
        print(cli.model_line(model), flush=True)
        print(cli.describe_device(engine.tr.moe, engine.tr), flush=True)
        print(f"context {engine.tr.n_ctx}, batch {engine.tr.n_batch}, ubatch {engine.tr.n_ubatch}; "
              f"prompt cache {'off' if args.no_prompt_cache else 'on'}", flush=True)
        with engine.tr.moe:
            try:
                t = engine.start()
            except ValueError as e:
                raise cli.CLIError(f"cannot run this model: {e}") from None
            print(f"warm-up (JIT compile) {t:.2f} s", flush=True)
            host, port = sock.getsockname()[:2]
            print(f"serving {model_id!r} on http://{host}:{port}/v1 "
                  f"(auth {'on' if args.api_key else 'off'})", flush=True)
            config = uvicorn.Config(create_app(engine, model_id, api_key=args.api_key or None),
                                    log_level=args.log_level, timeout_graceful_shutdown=5, lifespan="off")
            sock.listen(2048)
            try:
                uvicorn.Server(config).run(sockets=[sock])
            finally:
                engine.close()
    finally:
        sock.close()
    return 0
