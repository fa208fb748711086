"""ozwell_asgi: serve the Ozwell (OpenAI-compatible) /v1 API from any ASGI application.

from ozwell_asgi import OzwellAPI
app.mount("/v1", OzwellAPI(key_store="sqlite:///ozwell.db", secret=SECRET))
"""

from .app import OzwellAPI
from .auth import KeyHasher, KeyManager
from .backends.echo import EchoBackend
from .backends.function import FunctionBackend, Reply, function_backend
from .backends.openai_compatible import OpenAICompatibleBackend
from .backends.router import Route, RouterBackend
from .context import Settings
from .errors import (
    AuthenticationError,
    BadGatewayError,
    GatewayTimeoutError,
    InternalServerError,
    InvalidRequestError,
    NotFoundError,
    OzwellError,
    PermissionDeniedError,
    RateLimitError,
    ServiceUnavailableError,
)
from .hostauth import HostAuthenticator, user_principal
from .protocols import ChatBackend, CompletesChat, EmbeddingBackend, KeyStore, ModelCatalog, RateLimiter
from .ratelimit import DEFAULT_PLANS, LimitsRateLimiter, Plan
from .tokens import BPETokenizer, Tokenizer
from .types import (
    APIKey,
    AssistantMessage,
    Call,
    ChatChoice,
    ChatChunk,
    ChatResult,
    EmbeddingResult,
    ModelInfo,
    Principal,
    Quota,
    ToolCall,
    ToolCallDelta,
    Usage,
    UsageEvent,
)

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_PLANS",
    "APIKey",
    "AssistantMessage",
    "AuthenticationError",
    "BPETokenizer",
    "BadGatewayError",
    "Call",
    "ChatBackend",
    "ChatChoice",
    "ChatChunk",
    "ChatResult",
    "CompletesChat",
    "EchoBackend",
    "FunctionBackend",
    "EmbeddingBackend",
    "EmbeddingResult",
    "GatewayTimeoutError",
    "HostAuthenticator",
    "InternalServerError",
    "InvalidRequestError",
    "KeyHasher",
    "KeyManager",
    "KeyStore",
    "LimitsRateLimiter",
    "ModelCatalog",
    "ModelInfo",
    "NotFoundError",
    "OpenAICompatibleBackend",
    "OzwellAPI",
    "OzwellError",
    "PermissionDeniedError",
    "Plan",
    "Principal",
    "Quota",
    "RateLimitError",
    "RateLimiter",
    "Reply",
    "Route",
    "RouterBackend",
    "ServiceUnavailableError",
    "Settings",
    "Tokenizer",
    "ToolCall",
    "ToolCallDelta",
    "Usage",
    "UsageEvent",
    "function_backend",
    "user_principal",
]
