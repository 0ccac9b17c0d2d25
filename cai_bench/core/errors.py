"""Errors a user can cause and fix: the CLI prints them as one line and exits with code 2."""

import importlib
import re

from cai_bench.core.text import visible

# Colour and cursor codes that other libraries put in their messages (Rich panels, some compilers' errors)
_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]")
# A URL in free text: its scheme, then everything up to the next white space. Its user and password (redis://
# :PASSWORD@host) are everything before the LAST "@" of that run, as urllib.parse takes the host after the last
# one: a password holding "@" (or a "/" that ends the authority early) is hidden whole, never half.
_URL = re.compile(r"\b([A-Za-z][A-Za-z0-9+.-]*://)(\S*)")


def _hide_userinfo(match: re.Match) -> str:
    scheme, rest = match.groups()
    return scheme + ("***@" + rest.rpartition("@")[2] if "@" in rest else rest)


def redact(text: str) -> str:
    """``text`` with the user and password of every URL in it replaced: what may be printed or stored."""
    return _URL.sub(_hide_userinfo, text)


class UserError(Exception):
    """Bad input (path, file contents, option): the message says what is wrong and what to do."""

    exit_code = 2


ERROR_MAX = 2_000  # characters of an error line: one that quotes a whole file's worth is cut in its middle


def one_line(text: str) -> str:
    """``text`` on one line, without other libraries' colour codes or passwords in URLs, any other control
    character written as its escape (a message may quote a file or a record), and cut in the middle past
    ERROR_MAX (what went wrong is said at its end): what an error line may hold."""
    line = visible(" ".join(redact(_ANSI.sub("", text)).split()))
    if len(line) <= ERROR_MAX:
        return line
    half = ERROR_MAX // 2
    return f"{line[:half]} ... ({len(line) - 2 * half:,} characters left out) ... {line[-half:]}"


def describe(exc: BaseException) -> str:
    """One line for an error that happened elsewhere (a worker, an array task): a UserError's own message says
    all; anything else is named by its type, since its message alone may not say what went wrong."""
    return one_line(str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}")


def import_extra(module: str, extra: str, purpose: str):
    """``module`` imported, or one line saying which extra installs it: an optional package a command needs."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"{purpose} needs {module.split('.')[0]}: pip install 'cai-bench[{extra}]'") from None
