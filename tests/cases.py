"""Test cases drawn from the format registry, shared by the device tests (``tests/`` is on
sys.path through its conftest)."""
from quant import registry


def one_per_block_size(ts):
    """The first of ``ts`` per block size. The formats read through their block decoder share
    every line of a device kernel but that decoder (held bit-exact on its own, per format), so
    the slow simulator runs each kernel once per block size for them."""
    return list({registry.block_size(t): t for t in reversed(list(ts))}.values())


def blockwise(ts):
    """Those of ``ts`` whose device tiles come from their block decoder (``cuda_tile_parts``)."""
    return [t for t in ts if registry.get(t).cuda_tile_parts]
