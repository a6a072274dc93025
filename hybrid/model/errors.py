"""``GGUFError``: a file that cannot be loaded (its own module, so the architecture files and the
loader can both raise it without importing each other)."""
from __future__ import annotations

__all__ = ["GGUFError"]


class GGUFError(ValueError):
    """A GGUF file that cannot be loaded as a MoE model (the message names file and problem)."""
