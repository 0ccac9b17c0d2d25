"""Errors a user can cause and fix: the CLI prints them as one line and exits with code 2."""


class UserError(Exception):
    """Bad input (path, file contents, option): the message says what is wrong and what to do."""

    exit_code = 2


def describe(exc: BaseException) -> str:
    """One line for an error that happened elsewhere (a worker, an array task): a UserError's own message says
    all; anything else is named by its type, since its message alone may not say what went wrong."""
    return str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
