"""Errors a user can act on. The CLI prints them as one line and exits non-zero; anything else is a bug
and keeps its traceback."""


class RestspecError(Exception):
    """Bad input or a state the user can fix: the message says what was wrong and what to do."""


class DatastoreError(RestspecError):
    """A datastore is missing, corrupt, of another format version, or built with another tokenizer."""


class CorpusError(RestspecError):
    """A corpus path is missing, empty, or yields no text."""


class ModelError(RestspecError):
    """A model cannot be found or loaded."""


class GenerationError(RestspecError):
    """A request cannot be served as asked (prompt longer than the context, invalid sampling values)."""
