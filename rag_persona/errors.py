"""The one error type users see: a single line naming what went wrong and where."""


class RagPersonaError(Exception):
    """A user-facing failure; the CLI prints its message as one line and exits non-zero."""
