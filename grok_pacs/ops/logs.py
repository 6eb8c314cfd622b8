"""Process-wide logging: one line per event, UIDs and AE titles only, never patient attributes.

pynetdicom logs every PDU and, at debug level, dataset contents (which hold patient names), so its
logger is held at WARNING; our own modules log one summary line per association and per study.
"""

from __future__ import annotations

import logging
import sys

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
QUIET_LIBRARIES = ("pynetdicom", "celery", "kombu", "amqp", "sqlalchemy")


def configure_logging(level: str | int = "INFO") -> None:
    """Log to stderr at `level` (name or number); third-party chatter at WARNING."""
    numeric = logging.getLevelName(level.upper()) if isinstance(level, str) else level
    if not isinstance(numeric, int):
        raise ValueError(f"log level {level!r} is not one of DEBUG, INFO, WARNING, ERROR")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(max(numeric, logging.WARNING))
