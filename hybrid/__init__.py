"""Hybrid CPU/GPU backend for the MoE layers of GGUF models."""
from .layer import ExpertTensor, MoELayer

__all__ = ["ExpertTensor", "MoELayer"]
