"""Errors a user can fix: printed as one line, the run exits with status 1."""


class UserError(Exception):
    """A bad input (config value, missing file, corrupt checkpoint). The message names the problem and the fix."""
