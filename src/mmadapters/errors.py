"""The base class of mmadapters' own errors: the CLI reports any of them as one line (`error: ...`, exit 2)."""


class MMAdaptersError(Exception):
    """An error raised by mmadapters with a message that says what is wrong and what to do."""
