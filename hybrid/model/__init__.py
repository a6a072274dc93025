"""The model around the MoE layers: GGUF loading (``gguf``) and the built-in tiny model (``tiny``)."""
from .gguf import ARCHS, EXPERT_TYPES, GGUFError, Model, TensorInfo, load, split_paths
from .tiny import default_model_path, ensure_default_model, random_layer, tiny_layers, write_tiny

__all__ = ["ARCHS", "EXPERT_TYPES", "GGUFError", "Model", "TensorInfo", "load", "split_paths",
           "default_model_path", "ensure_default_model", "random_layer", "tiny_layers", "write_tiny"]
