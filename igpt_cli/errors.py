"""Errors that mean "bad input": the CLI prints them as one line and exits 2.

Library code names *parameters*, never command-line flags: a bad argument raises
`ParameterError("batch_size", 0, "must be at least 1")`, which reads
`batch_size=0: must be at least 1` from Python; the CLI rewrites it as
`--batch-size 0: must be at least 1` (see `igpt_cli.cli.errors`).
"""
from __future__ import annotations


class InputError(ValueError):
    """Bad user input (path, format, option). The message names the file or parameter and the problem."""

    quiet = False  # True: already reported elsewhere (another rank); exit 2 without a message


class ParameterError(InputError):
    """A bad value for a named parameter of a library function."""

    def __init__(self, param: str, value, problem: str):
        self.param, self.value, self.problem = param, value, problem
        super().__init__(f"{param}={value!r}: {problem}")


def check_choice(param: str, value, choices) -> str:
    """`value` as a string if it is one of `choices` (str Enum members accepted), else a ParameterError."""
    v = getattr(value, "value", value)
    if v not in choices:
        raise ParameterError(param, v, f"expected one of {', '.join(map(str, choices))}")
    return v


def check_positive(param: str, value, *, allow_none: bool = True, minimum: int = 1):
    """`value` unless it is below `minimum` (None passes when `allow_none`)."""
    if value is None and allow_none:
        return value
    if value is None or value < minimum:
        raise ParameterError(param, value, f"must be at least {minimum}")
    return value


def plural(n: int, word: str) -> str:
    """A count and its noun for messages: `1 row`, `2 rows`, `1 labelled row` (the last word made plural)."""
    return f"{n:,} {word}" if n == 1 else f"{n:,} {word}s"
