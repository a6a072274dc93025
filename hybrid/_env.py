"""Environment checks that must run before numba is imported: numba's own import fails on
``NUMBA_NUM_THREADS=0`` with a traceback and takes ``abc`` with a warning only."""
import os
import sys


def check_numba_env():
    v = os.environ.get("NUMBA_NUM_THREADS")
    if v is None or "numba" in sys.modules:
        return
    try:
        ok = int(v) > 0
    except ValueError:
        ok = False
    if ok:
        return
    msg = f"NUMBA_NUM_THREADS={v!r}: must be a positive integer (or unset: all cores)"
    if sys.argv and (sys.argv[0] == "-m" or os.path.basename(sys.argv[0]) == "hybrid-moe"):
        # python -m hybrid / hybrid-moe: the command line's one line and exit code 2
        print(f"hybrid: error: {msg}", file=sys.stderr)
        raise SystemExit(2)
    raise ImportError(msg)
