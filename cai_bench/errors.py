"""Errors a user can cause and fix: the CLI prints them as one line and exits with code 2."""

import re

# Colour and cursor codes that other libraries put in their messages (Rich panels, some compilers' errors)
_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]")


class UserError(Exception):
    """Bad input (path, file contents, option): the message says what is wrong and what to do."""

    exit_code = 2


def one_line(text: str) -> str:
    """``text`` on one line, without terminal escape codes: what an error line may hold."""
    return " ".join(_ANSI.sub("", text).split())


def describe(exc: BaseException) -> str:
    """One line for an error that happened elsewhere (a worker, an array task): a UserError's own message says
    all; anything else is named by its type, since its message alone may not say what went wrong."""
    return one_line(str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}")
