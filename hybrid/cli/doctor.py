"""``doctor``: GPU, driver, CUDA libraries and a pinned vs pageable copy; what to install."""
from __future__ import annotations

from .common import NONNEG

HELP = "GPU, driver, CUDA libraries, a pinned vs pageable copy; what to install"


def add_arguments(p):
    p.add_argument("--copy-mb", type=NONNEG, default=256, help="size of the copy test (MiB; 0 skips it)")


def main(args):
    from ..doctor import diagnose, render
    d = diagnose(copy_mb=args.copy_mb)
    print("\n".join(render(d)))
    if not d.ready:
        raise SystemExit(1)
