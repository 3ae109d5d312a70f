"""Errors that carry a message a user can act on."""


class MetafleetError(Exception):
    """Base of every error metafleet raises on purpose; the CLI prints it on one line and exits with 2."""


class ConfigError(MetafleetError, ValueError):
    """A configuration value is invalid; the message names the field and the value."""

    def __init__(self, field: str, value: object, requirement: str):
        self.field = field
        self.value = value
        super().__init__(f"config field '{field}': {requirement}, got {value!r}")


class DataError(MetafleetError, ValueError):
    """Client data is missing, corrupt, empty, wrongly shaped or not finite."""
