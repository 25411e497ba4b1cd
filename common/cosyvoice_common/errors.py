"""Typed exceptions that more than one package raises or catches."""


class CheckpointError(ValueError):
    """A checkpoint's keys or shapes do not match the module built from the config; the message names them."""


class InvalidRequestError(ValueError):
    """A request's inputs are out of range; the message names the field. Fails that request only."""
