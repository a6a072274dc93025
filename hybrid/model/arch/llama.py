"""llama with experts (Mixtral): the loader reads its MoE layers; the whole-model graph is not
here yet (issue 21: GQA, softmax top-k renormalised, no shared expert). Mixtral files have no
``expert_feed_forward_length``: their ``feed_forward_length`` is the experts'."""
from __future__ import annotations

from .base import Arch


class Llama(Arch, name="llama"):
    note = "Mixtral"
    has_graph = False
    n_ff_from_feed_forward = True
