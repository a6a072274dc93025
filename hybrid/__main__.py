"""``python -m hybrid`` and the ``hybrid-moe`` console script: see ``hybrid.cli`` (one module per command)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
