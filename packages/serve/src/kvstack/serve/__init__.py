"""The model server: paged KV cache, continuous batching, an OpenAI-compatible API, and
prefill/decode disaggregation over kvstack.transfer and kvstack.store.
"""

__all__: list[str] = []
