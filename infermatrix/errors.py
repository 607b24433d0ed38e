"""The one exception type for bad user input: the CLI prints its message on one
line and exits with status 2, without a traceback."""


class UserError(Exception):
    """Bad input from the user. The message names the field, what was wrong and the fix."""
