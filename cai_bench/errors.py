"""Errors a user can cause and fix: the CLI prints them as one line and exits with code 2."""


class UserError(Exception):
    """Bad input (path, file contents, option): the message says what is wrong and what to do."""

    exit_code = 2
