"""Text about a task's exception that cannot fail, whatever the exception does.

A task's exception is user code: its ``__str__`` may raise, return something
that is not a string, or fall back to an argument's ``__repr__`` that raises;
its text may hold lone surrogates, which no UTF-8 encoder accepts (so the
``Done`` message carrying it could not be encoded).  These texts are built in
the executor's bookkeeping (``Executor.collect``, in the Worker's ``receive``),
where an exception would crash the Worker actor and lose every result of the
batch; so every step here has a fallback that still names the exception's type.
"""

from __future__ import annotations

import traceback

__all__ = ["clean_text", "error_text", "message_text", "traceback_text", "type_name"]


def clean_text(text: str) -> str:
    """``text`` made encodable as UTF-8 (lone surrogates become ``\\udcxx`` escapes)."""
    if text.isascii():
        return text
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def type_name(exc: BaseException) -> str:
    """The exception's class name (a metaclass could make ``__name__`` anything)."""
    name = type(exc).__name__
    return clean_text(name) if type(name) is str else "exception"


def message_text(exc: BaseException) -> str:
    """``str(exc)``, or a text saying it could not be had."""
    try:
        message = str(exc)
    except Exception as failure:  # any failure of user code gets the fallback
        return f"<{type_name(exc)} str() failed: {type_name(failure)}>"
    return clean_text("" + message)  # concatenation: a str subclass runs no code


def error_text(exc: BaseException) -> str:
    """``"ExceptionType: message"``, or a text saying the message could not be had."""
    name = type_name(exc)
    try:
        message = str(exc)
    except Exception as failure:  # any failure of user code gets the fallback
        return f"{name}: <exception str() failed: {type_name(failure)}>"
    return clean_text(name + ": " + message)  # concatenation: a str subclass runs no code


def traceback_text(exc: BaseException) -> str:
    """The formatted traceback, or the error text and why the traceback is missing."""
    try:
        text = "".join(traceback.format_exception(exc))
    except Exception as failure:  # any failure of user code gets the fallback
        return f"{error_text(exc)}\n<the traceback could not be formatted: {type_name(failure)}>"
    return clean_text(text)
