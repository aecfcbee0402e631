"""OpenTelemetry GenAI vocabulary: provider names, operations, error categories.

Every source names providers its own way (`azure-openai`, `bedrock`,
`vertex_ai`...); events carry the `gen_ai.provider.name` values, so that one
query groups the same provider whatever reported it.
"""

from __future__ import annotations

from typing import Final

PROVIDER_ALIASES: Final[dict[str, str]] = {
    "openai": "openai",
    "text-completion-openai": "openai",
    "anthropic": "anthropic",
    "azure": "azure.ai.openai",
    "azure-openai": "azure.ai.openai",
    "azure_openai": "azure.ai.openai",
    "azure_ai": "azure.ai.inference",
    "azure-ai-foundry": "azure.ai.inference",
    "bedrock": "aws.bedrock",
    "aws-bedrock": "aws.bedrock",
    "vertex_ai": "gcp.vertex_ai",
    "vertex_ai_beta": "gcp.vertex_ai",
    "gemini": "gcp.gemini",
    "google": "gcp.gemini",
    "mistral": "mistral_ai",
    "mistralai": "mistral_ai",
    "groq": "groq",
    "deepseek": "deepseek",
    "xai": "x_ai",
    "x-ai": "x_ai",
    "cohere": "cohere",
    "cohere_chat": "cohere",
    "perplexity": "perplexity",
    "watsonx": "ibm.watsonx.ai",
    "ollama": "ollama",
    "ollama_chat": "ollama",
}

ERROR_TYPES: Final = ("invalid_request_error", "authentication_error", "rate_limit_error",
                      "server_error", "not_found_error", "service_unavailable", "timeout",
                      "unknown")


def provider_name(raw: str | None) -> str | None:
    """The `gen_ai.provider.name` for a source's own provider name."""
    if not raw:
        return None
    key = raw.strip().lower()
    return PROVIDER_ALIASES.get(key, key.replace("-", "_"))


def error_type_for_status(status: int | None) -> str | None:
    """The error category of an HTTP status (None for a success)."""
    if status is None or status < 400:
        return None
    if status in (401, 403):
        return "authentication_error"
    if status == 404:
        return "not_found_error"
    if status == 429:
        return "rate_limit_error"
    if status in (408, 504):
        return "timeout"
    if status in (502, 503):
        return "service_unavailable"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


def error_type_for_name(name: str | None) -> str:
    """The error category of an exception or error-code name (`RateLimitError`...)."""
    text = (name or "").lower().replace("_", "")
    for needle, category in _ERROR_NAMES:
        if needle in text:
            return category
    return "unknown"


_ERROR_NAMES: Final = (
    ("ratelimit", "rate_limit_error"), ("timeout", "timeout"),
    ("auth", "authentication_error"), ("permission", "authentication_error"),
    ("notfound", "not_found_error"), ("unavailable", "service_unavailable"),
    ("badrequest", "invalid_request_error"), ("invalidrequest", "invalid_request_error"),
    ("contextwindow", "invalid_request_error"),
    ("internalserver", "server_error"), ("apierror", "server_error"),
)
