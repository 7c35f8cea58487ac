"""Errors a user can fix: printed as one line, the run exits with status 1; and a run's orderly interruption."""


class UserError(Exception):
    """A bad input (config value, missing file, corrupt checkpoint). The message names the problem and the fix."""


class RunInterrupted(Exception):
    """A signal stopped the run after a checkpoint of its place was written; the message says how to continue."""

    def __init__(self, message: str, exit_status: int):
        super().__init__(message)
        self.exit_status = exit_status
