"""Which expert each device slot holds, across ubatches and layers (LRU).

A pool of ``n_slots`` interchangeable device slots. ``assign`` gives every
expert of a round a slot: experts already resident are hits and keep theirs;
misses take the least recently used slots that this round does not need,
handed out in ascending order so consecutive ids land in consecutive slots
and still coalesce into one copy. ``persistent=False`` forgets everything
before each round: PR #15346's behaviour, nothing survives a ubatch.
"""
from __future__ import annotations

import numpy as np


class SlotPool:
    def __init__(self, n_slots: int, persistent: bool = True):
        if n_slots < 1:
            raise ValueError(f"a slot pool needs at least one slot, got {n_slots}")
        self.n_slots = int(n_slots)
        self.persistent = persistent
        self.clear()

    def clear(self) -> None:
        self._owner: list[tuple[int, int] | None] = [None] * self.n_slots
        self._where: dict[tuple[int, int], int] = {}
        self._last = np.zeros(self.n_slots, np.int64)  # 0 = never used
        self._clock = 0

    def assign(self, layer: int, experts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Slots (int32) for sorted unique ``experts`` and a mask of the misses to copy."""
        experts = np.asarray(experts)
        if experts.size > self.n_slots:
            raise ValueError(f"{experts.size} experts do not fit in {self.n_slots} slots")
        if not self.persistent:
            self.clear()
        self._clock += 1
        slots = np.full(experts.size, -1, np.int32)
        miss = np.ones(experts.size, bool)
        busy = np.zeros(self.n_slots, bool)
        for i, e in enumerate(experts.tolist()):
            s = self._where.get((layer, e))
            if s is not None:
                slots[i], miss[i], busy[s] = s, False, True
        n_miss = int(miss.sum())
        if n_miss:
            # LRU among the slots this round does not hold; ties to the lower slot.
            free = np.flatnonzero(~busy)
            order = np.lexsort((free, self._last[free]))
            chosen = np.sort(free[order[:n_miss]])
            for s in chosen.tolist():
                old = self._owner[s]
                if old is not None:
                    del self._where[old]
            for i, s in zip(np.flatnonzero(miss).tolist(), chosen.tolist()):
                key = (layer, int(experts[i]))
                self._owner[s] = key
                self._where[key] = s
                slots[i] = s
        self._last[slots] = self._clock
        return slots, miss

    def resident(self, layer: int) -> list[int]:
        return sorted(e for (l, e) in self._where if l == layer)
