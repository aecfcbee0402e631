"""The errors decoders raise."""


class DecodeError(ValueError):
    """An item that cannot become an event; the message says why, for the sender."""


class NotAnLLMCall(DecodeError):
    """A well-formed item that is not an LLM call (an Otoroshi GatewayEvent or
    AlertEvent): receivers skip it and count it as `not_llm_call`, as they do OTLP
    spans that are not LLM calls, rather than treat it as the sender's mistake."""
