"""Process-wide logging: one line per event, UIDs and AE titles only, never patient attributes.

pynetdicom logs every PDU and, at debug level, dataset contents (which hold patient names), so its
logger is held at WARNING; our own modules log one summary line per association and per study. Every record passes
`phi.PhiFilter` and tracebacks are printed by `phi.PhiFormatter`: library text that may quote dataset
values (pydicom's warnings, which `logging.captureWarnings` routes here instead of raw stderr, exception
messages) is redacted or reduced to the exception type.
"""

from __future__ import annotations

import logging
import sys

from grok_pacs.ops.phi import PhiFilter, PhiFormatter

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
QUIET_LIBRARIES = ("pynetdicom", "celery", "kombu", "amqp", "sqlalchemy")


def configure_logging(level: str | int = "INFO") -> None:
    """Log to stderr at `level` (name or number); third-party chatter at WARNING."""
    numeric = logging.getLevelName(level.upper()) if isinstance(level, str) else level
    if not isinstance(numeric, int):
        raise ValueError(f"log level {level!r} is not one of DEBUG, INFO, WARNING, ERROR")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(PhiFormatter(FORMAT))
    handler.addFilter(PhiFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    logging.captureWarnings(True)  # warnings.warn (pydicom's quote values) through the filter, not raw stderr
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(max(numeric, logging.WARNING))
