"""The one exception type for mistakes a user can fix (bad path, bad flag, bad data).

The CLI prints its message and exits non-zero, without a traceback. Anything else is a bug and keeps
its traceback.
"""


class TailleError(Exception):
    """A user-facing error: the message says what was wrong and what to do."""
