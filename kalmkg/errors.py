"""The one exception type for errors a user can cause.

The CLI prints its message on one line and exits with code 1; library callers can catch it.
"""


class KalmkgError(Exception):
    """An error caused by input, configuration or the state of a workspace (not a bug)."""


class WorkspaceBusy(KalmkgError):
    """Another process is writing the workspace (its writer lock, or the store held open for writing)."""
