"""Errors a user can fix: printed as one line, the run exits with status 1; and a run's orderly interruption.
Standard library only: command-line tools (tools/) import it without the training runtime."""

ERROR_FILE = "error.txt"  # in the folder of a sweep's failed job (engine.entry writes it, tools.report reads it)


class UserError(Exception):
    """A bad input (config value, missing file, corrupt checkpoint). The message names the problem and the fix."""


class RunInterrupted(Exception):
    """A signal stopped the run after a checkpoint of its place was written; the message says how to continue."""

    def __init__(self, message: str, exit_status: int):
        super().__init__(message)
        self.exit_status = exit_status
