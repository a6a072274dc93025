"""Hybrid CPU/GPU backend for the MoE layers of GGUF models."""
from .layer import ExpertTensor, MoELayer, random_layer

__all__ = ["ExpertTensor", "MoELayer", "random_layer"]
