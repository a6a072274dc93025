"""The architectures, by ``general.architecture``: one file each, one table (``REGISTRY``).

An architecture is a subclass of ``base.Arch`` that registers itself with its GGUF name
(``class GptOss(Arch, name="gpt-oss")``): its hyper-parameters from the file's keys, its
tensor names, its MoE operation (a ``hybrid.moe.spec.MoESpec``) and its block, written
once against the ``Ops`` interface that the host, the device and the float64 reference
implement. docs/design.md says step by step how to add one. The loader (``gguf.py``),
``config.py``, the forward and the tiny-model writers ask this table; nothing else
names an architecture.
"""
from __future__ import annotations

from ..errors import GGUFError
from .base import REGISTRY, Arch, Block

# One line per architecture: importing the file registers it.
from . import gpt_oss, qwen3moe, qwen2moe, llama, glm4moe, deepseek2  # noqa: E402,F401

__all__ = ["REGISTRY", "Arch", "Block", "get", "names", "with_graph"]


def names() -> tuple[str, ...]:
    """Every architecture the loader accepts."""
    return tuple(REGISTRY)


def with_graph() -> tuple[str, ...]:
    """The architectures with a whole-model graph (``Transformer`` runs them)."""
    return tuple(n for n, a in REGISTRY.items() if a.has_graph)


def get(name, path="", graph: bool = False) -> Arch:
    """The architecture ``name``, or a GGUFError naming the ones there are (``graph``: it must
    have a whole-model graph)."""
    where = f"{path}: " if path else ""
    a = REGISTRY.get(name)
    if a is None:
        raise GGUFError(f"{where}architecture {name!r} is not supported; supported MoE architectures: "
                        f"{', '.join(f'{n} ({a.note})' if a.note else n for n, a in REGISTRY.items())}")
    if graph and not a.has_graph:
        raise GGUFError(f"{where}architecture {name!r} has no whole-model graph here; "
                        f"supported: {', '.join(with_graph())}")
    return a
