"""The one error every decoder raises."""


class DecodeError(ValueError):
    """An item that cannot become an event; the message says why, for the sender."""
