"""One exception type for every failure a user can fix.

Library code raises `FdpipeError` with a single line that says what is wrong and what to do; the CLI prints it
and exits 1. Anything else escaping is a bug and keeps its traceback.
"""


class FdpipeError(Exception):
    """A user-facing error: one line, what is wrong and what to do."""


class StoreError(FdpipeError):
    """The store is missing, incomplete, corrupt, or was made with other settings."""


class IncompleteStoreError(StoreError):
    """The store has no manifest.json: extraction has not finished (or crashed) and can be resumed."""


class FdpipeWarning(UserWarning):
    """Something the user should know that does not stop the command (a slower path taken, a degenerate store):
    the CLI prints it as one line, `warning: ...`."""
