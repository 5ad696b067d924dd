"""Exceptions moeify raises on purpose; the CLI turns them into one-line messages."""


class MoeifyError(Exception):
    """Base class: a refusal with a message that says what is wrong and what to do."""


class ConversionError(MoeifyError):
    """A model, spec or layer that cannot be converted; the message names the layer or op and why."""


class RoutingError(MoeifyError):
    """A router produced scores that cannot be routed (NaN or inf)."""
