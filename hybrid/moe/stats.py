"""What the scheduler did, per layer and ubatch: usage, copies, bytes, times.

Kept as plain records (data) with text reports on top; the usage lines are
printed exactly as PR #15346's discussion printed them.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

STEPS = ("route", "plan", "copy", "compute", "wait")


@dataclass
class TensorRecord:
    name: str  # GGUF name, e.g. blk.0.ffn_gate_exps.weight
    used: int
    total: int
    copies: int
    bytes: int
    hits: int = 0  # experts found resident in the VRAM cache


@dataclass
class UbatchRecord:
    layer: int
    ubatch: int  # index of the ubatch within the run
    n_tokens: int
    path: str  # "cpu" or "offload"
    policy: str  # "all" or "used"
    used: int
    n_experts: int
    rounds: int = 1
    tensors: list[TensorRecord] = field(default_factory=list)
    times: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STEPS, 0.0))

    @property
    def copies(self) -> int:
        return sum(t.copies for t in self.tensors)

    @property
    def bytes(self) -> int:
        return sum(t.bytes for t in self.tensors)

    @property
    def hits(self) -> int:
        return self.tensors[0].hits if self.tensors else 0


class Stats:
    def __init__(self):
        self.records: list[UbatchRecord] = []

    def add(self, rec: UbatchRecord) -> None:
        self.records.append(rec)

    def clear(self) -> None:
        self.records.clear()

    def usage_lines(self, ubatch: int | None = None) -> list[str]:
        """``blk.N.ffn_gate_exps.weight: 95/128 experts used`` for one ubatch (default: the last)."""
        if not self.records:
            return []
        ub = self.records[-1].ubatch if ubatch is None else ubatch
        return [f"{t.name}: {t.used}/{t.total} experts used"
                for r in self.records if r.ubatch == ub for t in r.tensors if t.name.endswith(".weight")]

    def totals(self) -> dict:
        tot = {"tokens": 0, "copies": 0, "bytes": 0, "hits": 0, "offloaded": 0, "cpu": 0}
        times = dict.fromkeys(STEPS, 0.0)
        seen_ubatches = set()
        for r in self.records:
            if r.ubatch not in seen_ubatches:
                seen_ubatches.add(r.ubatch)
                tot["tokens"] += r.n_tokens
            tot["copies"] += r.copies
            tot["bytes"] += r.bytes
            tot["hits"] += r.hits
            tot["offloaded" if r.path == "offload" else "cpu"] += 1
            for s in STEPS:
                times[s] += r.times[s]
        tot["times"] = times
        return tot

    def per_layer(self) -> dict[int, dict]:
        """Mean experts used, copies and bytes per ubatch, for each layer."""
        acc = defaultdict(lambda: {"ubatches": 0, "used": 0, "copies": 0, "bytes": 0, "hits": 0})
        for r in self.records:
            a = acc[r.layer]
            a["ubatches"] += 1
            a["used"] += r.used
            a["copies"] += r.copies
            a["bytes"] += r.bytes
            a["hits"] += r.hits
        return {layer: {"mean_used": a["used"] / a["ubatches"], **a} for layer, a in sorted(acc.items())}

    def report(self) -> str:
        """A short text report: usage of the last ubatch, then totals."""
        lines = self.usage_lines()
        t = self.totals()
        tm = t["times"]
        lines += [
            "",
            f"layer-ubatches: {t['offloaded']} offloaded, {t['cpu']} on the CPU; tokens: {t['tokens']}",
            f"copies: {t['copies']}, bytes: {t['bytes'] / 1e6:.1f} MB, cache hits: {t['hits']} experts",
            "time (s): " + ", ".join(f"{s} {tm[s]:.3f}" for s in STEPS),
        ]
        return "\n".join(lines)
