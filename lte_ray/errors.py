"""User mistakes: the CLI prints the one-line message and exits with code 2, no traceback."""


class UserError(ValueError):
    """Bad input from the user (config, data, paths); the message is one line naming the field."""
