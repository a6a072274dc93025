"""Hybrid CPU/GPU backend for the MoE layers of GGUF models.

    from hybrid import load, HybridMoE
    model = load("gpt-oss-20b-mxfp4.gguf")
    with HybridMoE(model.layers, device="auto", policy="used") as moe:
        y = moe.forward(0, x)          # x: float32 [n_tokens, n_embd]
        print(moe.stats.report())

The whole model: ``Transformer(model).prefill(ids)`` (logits), ``generate``, ``Tokenizer.from_model``.
"""
from ._env import check_numba_env

check_numba_env()  # before numba's import: a bad NUMBA_NUM_THREADS is one line, not its traceback
from .model import (GGUFError, Model, Tokenizer, Transformer, ensure_default_model, generate, load,
                    random_layer, write_tiny)
from .moe.copyplan import CopyPlan, CostModel, plan
from .moe.layer import ExpertTensor, MoELayer
from .moe.reference import moe_reference
from .moe.routing import Buckets, bucket, route
from .moe.scheduler import HybridMoE, resolve_device
from .moe.stats import Stats
from .moe.traffic import PRESETS, synthetic_logits

__all__ = [
    "Buckets", "CopyPlan", "CostModel", "ExpertTensor", "GGUFError", "HybridMoE", "Model", "MoELayer",
    "PRESETS", "Stats", "Tokenizer", "Transformer", "bucket", "ensure_default_model", "generate", "load", "moe_reference", "plan", "random_layer",
    "resolve_device", "route", "synthetic_logits", "write_tiny",
]
