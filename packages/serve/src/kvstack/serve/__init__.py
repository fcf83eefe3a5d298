"""The model server: a Llama model (SmolLM2 from GGUF, or a random tiny one) served with a paged
KV cache, prefix reuse and continuous batching behind an OpenAI-compatible API, and a benchmark
client. Run it with ``kvstack-serve up`` / ``python -m kvstack.serve up``.
"""

from kvstack.serve._async_engine import AsyncEngine
from kvstack.serve._attention import (
    AttentionBackend,
    BatchLayout,
    PagedKVCache,
    TorchPagedAttention,
    TritonPagedAttention,
    make_attention_backend,
)
from kvstack.serve._chat import ChatMessage, ChatTemplate
from kvstack.serve._config import EngineConfig, ServerConfig, parse_size
from kvstack.serve._engine import EngineStats, LLMEngine
from kvstack.serve._kv_cache import BlockPool, KVCacheStats, block_hash, chain_hashes, root_hash
from kvstack.serve._launch import ServerProcess
from kvstack.serve._loader import (
    SMOLLM2_NAME,
    LoadedModel,
    find_smollm2_gguf,
    load_gguf,
    load_model,
    load_tiny,
)
from kvstack.serve._model import LlamaModel, ModelConfig
from kvstack.serve._policy import (
    CacheAwarePolicy,
    PolicyName,
    PowerOfTwoPolicy,
    PrefixTree,
    RandomPolicy,
    RoundRobinPolicy,
    RoutingPolicy,
    WorkerLoad,
    make_policy,
    routing_key,
)
from kvstack.serve._request import FinishReason, RequestOutput
from kvstack.serve._router import (
    TRACE_HEADER,
    WORKER_HEADER,
    BreakerState,
    Router,
    RouterConfig,
    run_router,
)
from kvstack.serve._sampling import SamplingParams
from kvstack.serve._server import create_app, run_server
from kvstack.serve._tokenizer import TextTokenizer
from kvstack.serve.errors import (
    BenchError,
    ConfigError,
    EngineError,
    EngineStopped,
    InvalidRequest,
    ModelError,
    ModelNotFound,
    NoWorkerAvailable,
    PromptTooLong,
    RequestTimeout,
    RouterError,
    ServeError,
    ServerStartError,
    UnknownModel,
    UnsupportedModel,
    UpstreamError,
)

__all__ = [
    "SMOLLM2_NAME",
    "TRACE_HEADER",
    "WORKER_HEADER",
    "AsyncEngine",
    "AttentionBackend",
    "BatchLayout",
    "BenchError",
    "BlockPool",
    "BreakerState",
    "CacheAwarePolicy",
    "ChatMessage",
    "ChatTemplate",
    "ConfigError",
    "EngineConfig",
    "EngineError",
    "EngineStats",
    "EngineStopped",
    "FinishReason",
    "InvalidRequest",
    "KVCacheStats",
    "LLMEngine",
    "LlamaModel",
    "LoadedModel",
    "ModelConfig",
    "ModelError",
    "ModelNotFound",
    "NoWorkerAvailable",
    "PagedKVCache",
    "PolicyName",
    "PowerOfTwoPolicy",
    "PrefixTree",
    "PromptTooLong",
    "RandomPolicy",
    "RequestOutput",
    "RequestTimeout",
    "RoundRobinPolicy",
    "Router",
    "RouterConfig",
    "RouterError",
    "RoutingPolicy",
    "SamplingParams",
    "ServeError",
    "ServerConfig",
    "ServerProcess",
    "ServerStartError",
    "TextTokenizer",
    "TorchPagedAttention",
    "TritonPagedAttention",
    "UnknownModel",
    "UnsupportedModel",
    "UpstreamError",
    "WorkerLoad",
    "block_hash",
    "chain_hashes",
    "create_app",
    "find_smollm2_gguf",
    "load_gguf",
    "load_model",
    "load_tiny",
    "make_attention_backend",
    "make_policy",
    "parse_size",
    "root_hash",
    "routing_key",
    "run_router",
    "run_server",
]
