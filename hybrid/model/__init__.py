"""The model around the MoE layers: GGUF loading (``gguf``), the whole forward (``config``, ``dense``,
``ops``, ``kvcache``, ``forward``, ``generate``, float64 ``reference``), its device side
(``device_dense``, ``device_ops``, ``device_attention``, ``vram``), the tokenizer, the built-in
tiny models (``tiny``) and gpt-oss shapes with random weights in memory (``synthetic``)."""
from .config import Config, read_config
from .forward import Transformer
from .generate import generate, sample
from .gguf import ARCHS, GGUFError, Model, TensorInfo, load, split_paths
from .tiny import default_model_path, ensure_default_model, random_layer, tiny_layers, write_tiny
from .synthetic import synthetic_model
from .tokenizer import Tokenizer

__all__ = ["ARCHS", "Config", "GGUFError", "Model", "TensorInfo", "Tokenizer", "Transformer",
           "default_model_path", "ensure_default_model", "generate", "load", "random_layer", "read_config",
           "sample", "split_paths", "synthetic_model", "tiny_layers", "write_tiny"]
