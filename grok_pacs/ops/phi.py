"""Keeping patient attributes out of everything the service writes besides the DICOM it sends.

Received instances carry patient name, ID, birth date and accession number, and those values leak through
text we did not write: a pydicom warning quotes the offending value ("Invalid value for VR DA: '20XX13'"),
a library's exception message may hold a value or an SQL statement's parameters. So:

- `describe(exc)` reduces an exception to its type name, plus the message only when the message is ours
  (an exception class of grok_pacs, whose messages hold UIDs, paths, AE titles and reasons, never patient
  attributes) or an OS error's errno text. It is what goes into study details, outbox notes and logs.
- `redact_values(text)` replaces quoted values (the form libraries use to show them) with `'<redacted>'`.
- `PhiFilter` applies both to log records (exception arguments, library loggers' messages) and
  `PhiFormatter` prints tracebacks with `describe()`d exception lines (the frames are code locations).
"""

from __future__ import annotations

import logging
import re
import traceback
from types import TracebackType

OUR_PACKAGE = "grok_pacs"
# Loggers whose messages are library text that may quote dataset values (py.warnings: Python warnings,
# routed into logging by logs.configure_logging; celery.redirected: stray prints to stdout/stderr).
FOREIGN_LOGGERS = ("py.warnings", "pydicom", "highdicom", "pynetdicom", "celery.redirected", "PIL")
MESSAGE_MAX = 300  # a redacted library message longer than this is cut (an oversized value never fits)
# '...', "..." and b'...' in library text; a backslash-escaped quote does not end the value.
_QUOTED = re.compile(r"""b?'(?:[^'\\]|\\.)*'|b?"(?:[^"\\]|\\.)*\"""", re.DOTALL)
REDACTED = "'<redacted>'"
CAUSE = "\nThe above exception was the direct cause of the following exception:\n\n"
CONTEXT = "\nDuring handling of the above exception, another exception occurred:\n\n"


def _is_ours(exc: BaseException) -> bool:
    return type(exc).__module__.split(".", 1)[0] == OUR_PACKAGE


def describe(exc: BaseException, limit: int = 300) -> str:
    """`Type: message` for our own exceptions, `Type: [Errno n] text` for OS errors, `Type` otherwise;
    one line, at most `limit` characters."""
    name = type(exc).__name__
    if _is_ours(exc):
        text = str(exc).strip()
    elif isinstance(exc, OSError) and exc.errno is not None:
        text = f"[Errno {exc.errno}] {exc.strerror}"  # no filename: the errno is what tells the reason
    else:
        text = ""
    line = f"{name}: {text.splitlines()[0]}" if text else name
    return line if len(line) <= limit else line[: limit - 3] + "..."


def redact_values(text: str, limit: int = MESSAGE_MAX) -> str:
    """`text` with every quoted value replaced, then cut to `limit` characters."""
    text = _QUOTED.sub(REDACTED, text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _safe_arg(value: object) -> object:
    return describe(value) if isinstance(value, BaseException) else value


class PhiFilter(logging.Filter):
    """Rewrites a record in place (never drops one): exception arguments become `describe()`d text; a
    library logger's message has its quoted values redacted; Celery's task-failure context ('exc', a
    repr of the exception) becomes the `describe()`d exception."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(_safe_arg(a) for a in record.args)
        elif isinstance(record.args, dict):
            record.args = self._safe_mapping(record.args, record.exc_info)
        if record.name.startswith(FOREIGN_LOGGERS):
            record.msg, record.args = redact_values(record.getMessage()), ()
        return True

    @staticmethod
    def _safe_mapping(args: dict, exc_info) -> dict:
        safe = {k: _safe_arg(v) for k, v in args.items()}
        if "exc" in safe and exc_info and exc_info[1] is not None:  # celery.app.trace's failure line
            safe["exc"] = describe(exc_info[1])
        elif "exc" in safe and isinstance(safe["exc"], str):
            safe["exc"] = redact_values(safe["exc"])
        return safe


def format_exception(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> str:
    """A traceback like Python's (causes and contexts first), each exception line `describe()`d."""
    chain: list[tuple[BaseException, str]] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    note = ""
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        chain.append((current, note))
        if current.__cause__ is not None:
            current, note = current.__cause__, CAUSE
        elif current.__context__ is not None and not current.__suppress_context__:
            current, note = current.__context__, CONTEXT
        else:
            current = None
    parts = []
    for item, link in reversed(chain):
        frames = "".join(traceback.format_tb(item.__traceback__))
        parts.append(f"Traceback (most recent call last):\n{frames}{describe(item)}\n{link}")
    return "".join(parts).rstrip("\n")


class PhiFormatter(logging.Formatter):
    """A formatter whose tracebacks show code locations and `describe()`d exceptions only."""

    def formatException(self, ei) -> str:  # noqa: N802 - logging's name
        exc_type, exc, tb = ei
        if exc is None:
            return ""
        return format_exception(exc_type, exc, tb)
