"""User mistakes: the CLI prints the one-line message and exits with code 2, no traceback."""


class UserError(ValueError):
    """Bad input from the user (config, data, paths); the message is one line naming the field."""


class ConfigError(UserError):
    """A user mistake in the configuration; the message is one line that names the field."""
