"""The errors decoders raise, and how their reasons reach the daemon's log."""

from meterline import logs
from meterline.processors.redact.engine import masked


class DecodeError(ValueError):
    """An item that cannot become an event; the message says why, for the sender."""


class TooManyItems(DecodeError):
    """A body of more items than `bounds.ITEMS_MAX`, or of more JSON objects and arrays than
    `bounds.CONTAINERS_MAX`: refused whole, before anything in it is decoded (HTTP 413),
    since each would take memory out of proportion to its bytes."""


class NotAnLLMCall(DecodeError):
    """A well-formed item that is not an LLM call (an Otoroshi GatewayEvent or
    AlertEvent): receivers skip it and count it as `not_llm_call`, as they do OTLP
    spans that are not LLM calls, rather than treat it as the sender's mistake."""


def loggable(reason: str) -> str:
    """A refusal's reason as a receiver logs it: a reason may quote the item (msgspec names
    an unknown field, a decoder the value it refused), so what the detectors find in it is
    masked, and it is one bounded line. The sender's answer keeps the reason whole."""
    return logs.bounded(masked([reason])[0])
