"""Errors caused by user input: stages print them as one line, without a traceback."""


class UserError(Exception):
    """Bad config, bad data or a missing input: something the user fixes, not a bug."""


class ConfigError(UserError):
    """params.yaml (or a conf/ choice) holds an unknown key or a value out of range."""
