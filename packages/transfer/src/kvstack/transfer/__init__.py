"""The transfer engine: registered memory segments, batched zero-copy reads and writes between
processes and hosts (shared memory, TCP, CUDA), and the metadata service that names segments.
"""

__all__: list[str] = []
