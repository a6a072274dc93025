"""The command line: ``python -m hybrid {info,run,bench,usage,doctor}`` (also ``hybrid-moe``).

Flags follow llama.cpp where they mean the same: ``-m`` model, ``-p`` prompt
tokens, ``-n`` tokens to generate, ``-c`` context, ``-b``/``-ub`` batch and
ubatch size. Without ``-m`` every command uses the built-in tiny gpt-oss model.
``run`` and ``bench`` run the whole model (text, ``--tokens`` or ``-p`` random
ids through every block); with ``--moe-only`` (or ``--hidden``) they feed the
MoE layers alone with the same hidden states, read from ``--hidden`` or made up
(synthetic), for kernel benchmarks. User errors (missing or bad files, bad
numbers) end with one line on stderr and exit code 2.

One module per command, each with ``HELP``, ``add_arguments(parser)`` and
``main(args)``; ``common`` holds what they share. A new command is a module and
one line in ``COMMANDS``. Parsing and printing only: nothing is computed here.
"""
from __future__ import annotations

import importlib

from ..report import ReportError
from .common import MAX_TOKENS, CLIError, Parser, fail

# name -> module (HELP, add_arguments, main), in the order --help lists them
COMMANDS = {
    "info": "hybrid.cli.info",
    "run": "hybrid.cli.run",
    "bench": "hybrid.cli.bench",
    "usage": "hybrid.cli.usage",
    "doctor": "hybrid.cli.doctor",
    "serve": "hybrid.serve",
}

__all__ = ["COMMANDS", "MAX_TOKENS", "CLIError", "build_parser", "fail", "main"]


def _command(name):
    return importlib.import_module(COMMANDS[name])


def build_parser() -> Parser:
    ap = Parser(prog="hybrid", description="MoE layers of GGUF models on a small GPU, experts in host RAM "
                "(used-expert offload after llama.cpp PR #15346).")
    sub = ap.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    for name in COMMANDS:
        mod = _command(name)
        help_ = getattr(mod, "HELP", None) or (mod.__doc__ or "").strip().split("\n")[0]
        mod.add_arguments(sub.add_parser(name, help=help_))
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _command(args.command).main(args)
    except (CLIError, ReportError) as e:
        fail(str(e))
    except MemoryError as e:  # a model or prompt larger than this machine: one line, not a traceback
        fail(f"out of memory{': ' + str(e) if str(e) else ''}")
    return 0
