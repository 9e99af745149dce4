"""The one exception type users see: a clear, one-line message about their input."""


class InherccError(Exception):
    """A user-facing error (bad input, bad option, unwritable output). The CLI prints it on one line."""
