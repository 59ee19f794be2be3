"""Errors that mean "bad input": the CLI prints them as one line and exits 2."""


class InputError(ValueError):
    """Bad user input (path, format, option). Message names the file and the problem."""
