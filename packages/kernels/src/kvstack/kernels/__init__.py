"""Triton kernels for the serving path (paged attention, KV page movement, the FP8
accumulator-precision probe), each beside the PyTorch reference that defines it.
"""

__all__: list[str] = []
