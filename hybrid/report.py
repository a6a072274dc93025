"""What the command line prints beyond plain lines: PR #15346's bench table, the machine, usage lines, the heatmap."""
from __future__ import annotations

import os
import platform
from pathlib import Path

import numpy as np


class ReportError(Exception):
    """A report that cannot be made (matplotlib missing, file not writable); the CLI prints it."""


def bench_table(model_name, n_prompt, rows, variants, device="cuda") -> str:
    """PR #15346's table: t/s per variant with speedups over ``all``, then MB and copies per token.

    ``rows``: ``(ubatch, {variant: {"tps", "mb", "copies"}})``; times not from a GPU are labelled.
    """
    tag = {"cpu": " (CPU)", "sim": " (sim)"}.get(device, "")
    cols = ["model", "ubatch", "test"]
    for v in variants:
        cols.append(f"t/s {v}{tag}")
        if v != "all" and "all" in variants:
            cols.append("speedup" if v == "used" else f"speedup {v}")
    cols += [f"MB/token {v}" for v in variants] + [f"copies/token {v}" for v in variants]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * (len(cols) - 3)) + "|"]
    for ub, res in rows:
        cells = [model_name, str(ub), f"pp{n_prompt}"]
        for v in variants:
            cells.append(f"{res[v]['tps']:.1f}")
            if v != "all" and "all" in variants:
                cells.append(f"{res[v]['tps'] / res['all']['tps']:.2f}x")
        cells += [f"{res[v]['mb']:.4f}" for v in variants] + [f"{res[v]['copies']:.3f}" for v in variants]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine_line(device: str = "cpu") -> str:
    """The machine a table was measured on: CPU model, logical cores, the ISA of our CPU
    kernels, and on the ``cuda`` target the GPU's name (``sim``: the simulator)."""
    from .kernels.cpu.ir import best_isa
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), model)
    except OSError:
        pass
    line = f"CPU: {model}, {os.cpu_count()} logical cores; our CPU kernels: {best_isa()}"
    if device == "cuda":
        from numba import cuda
        name = cuda.get_current_device().name
        line += f"; GPU: {name.decode() if isinstance(name, bytes) else name}"
    elif device == "sim":
        line += "; GPU: the numba-cuda simulator (no speed)"
    return line


def usage_report(stats, parts) -> list[str]:
    """PR #15346's usage lines for the last ubatch, or for the last offloaded one when the
    last ran on the CPU (a short tail: the CPU path copies nothing)."""
    offloaded = [r.ubatch for r in stats.records if r.path == "offload"]
    if not offloaded:
        return ["experts used: no ubatch was offloaded (all below --min-offload-batch), no copies"]
    u = max(offloaded)
    s, e = parts[u]
    head = f"experts used, ubatch {u} ({e - s} tokens)"
    if u != len(parts) - 1:
        n_last = parts[-1][1] - parts[-1][0]
        head += f"; the last ubatch ({n_last} tokens) ran on the CPU"
    else:
        head += ", the last"
    return [head + ":"] + stats.usage_lines(u)


def _figure_class():
    try:  # the object API: no pyplot, so no global backend is chosen for the caller
        from matplotlib.figure import Figure
    except ImportError:
        raise ReportError("the heatmap needs matplotlib: pip install 'hybrid-moe[plot]' "
                          "(or pip install matplotlib)") from None
    return Figure


def heatmap_path(path) -> Path:
    """The file ``save_heatmap`` writes for ``path``, checked before any work is done:
    no extension means ``.png`` added; a folder or an image format matplotlib cannot
    write is a ReportError."""
    Figure = _figure_class()
    path = Path(path)
    if path.is_dir():
        raise ReportError(f"{path} is a directory: give the heatmap's file name, e.g. {path / 'usage.png'}")
    if not path.suffix:
        return path.with_name(path.name + ".png")
    formats = Figure().canvas.get_supported_filetypes()
    if path.suffix[1:].lower() not in formats:
        raise ReportError(f"{path}: cannot write a heatmap as {path.suffix!r}; image formats: "
                          f"{', '.join('.' + f for f in sorted(formats))}")
    return path


def save_heatmap(counts: np.ndarray, n_experts: int, path, title: str = "", layer_ids=None) -> Path:
    """A heatmap of ``counts`` [layers, ubatches] (experts used) saved to ``heatmap_path(path)``,
    which it returns."""
    path = heatmap_path(path)
    Figure = _figure_class()
    n_layers, n_ub = counts.shape
    layer_ids = list(range(n_layers)) if layer_ids is None else list(layer_ids)
    fig = Figure(figsize=(min(2 + 0.5 * n_ub, 16), min(1.5 + 0.3 * n_layers, 14)))
    ax = fig.subplots()
    im = ax.imshow(counts, aspect="auto", cmap="viridis", vmin=0, vmax=n_experts, interpolation="nearest")
    fig.colorbar(im, ax=ax, label=f"experts used (of {n_experts})")
    ax.set_xlabel("ubatch")
    ax.set_ylabel("layer")
    ax.set_yticks(range(n_layers), [str(i) for i in layer_ids])
    if n_ub * n_layers <= 400:  # numbers in the cells while they stay readable
        for (i, j), v in np.ndenumerate(counts):
            ax.text(j, i, str(v), ha="center", va="center", fontsize=7,
                    color="white" if v < 0.6 * n_experts else "black")
    ax.set_title(title)
    fig.tight_layout()
    try:
        fig.savefig(path, format=path.suffix[1:].lower())
    except OSError as e:
        raise ReportError(f"cannot write {path}: {e.strerror or e}") from None
    return path
