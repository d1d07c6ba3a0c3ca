"""Logging set-up: plain text or one JSON object per line. Nothing here may log PHI; callers log UIDs and
AE titles only."""

from __future__ import annotations

import json
import logging
import sys
import warnings
from datetime import datetime, timezone
from typing import Any

# Loggers of DICOM libraries whose messages may quote a header value ("Invalid value for VR DA: '...'").
_VALUE_QUOTING_LOGGERS = ("pydicom", "highdicom")
_warnings_logger = logging.getLogger("py.warnings")


class HeaderValueFilter(logging.Filter):
    """On every handler: DICOM libraries' messages never reach the log with their text.

    pydicom's value warnings quote the offending value, which is often a patient's name or ID. Records of
    ``pydicom`` / ``highdicom`` below ERROR are dropped; ERROR and above keep their level and logger with the
    text withheld, so that something went wrong stays visible.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.split(".", 1)[0] not in _VALUE_QUOTING_LOGGERS:
            return True
        if record.levelno < logging.ERROR:
            return False
        record.msg, record.args, record.exc_info, record.exc_text = (
            "message withheld (a DICOM library's message may quote header values)", None, None, None)
        return True


def _show_warning_without_text(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                               file: Any = None, line: str | None = None) -> None:
    """``warnings.showwarning``: category and origin only, never the text (it may quote a header value)."""
    _warnings_logger.warning("%s at %s:%d (text withheld: warnings may quote header values)",
                             category.__name__, filename, lineno)


def protect_logs() -> None:
    """Keep header values out of this process's output, whatever logging set-up follows.

    Every role (``configure_logging``) and every CLI command (``node.cli.main``) calls this: Python warnings
    are logged by category and origin only, and pydicom's own logger does not propagate its value messages.
    """
    warnings.showwarning = _show_warning_without_text
    for name in _VALUE_QUOTING_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, HeaderValueFilter) for f in logger.filters):
            logger.addFilter(HeaderValueFilter())
    root = logging.getLogger()
    for handler in root.handlers:
        if not any(isinstance(f, HeaderValueFilter) for f in handler.filters):
            handler.addFilter(HeaderValueFilter())


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        payload = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            payload["exception"] = self.formatException(record.exc_info)
        return json.dumps(payload)


def configure_logging(level: str = "INFO", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(HeaderValueFilter())  # records of child loggers skip logger filters, never a handler's
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.captureWarnings(True)  # warnings.warn output goes through the same (JSON) handler
    protect_logs()  # ... by category and origin only (after captureWarnings, which replaces showwarning)
    # pynetdicom's INFO/DEBUG output can include dataset dumps; keep it to warnings.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    # APScheduler logs every interval run at INFO; the scheduler role logs what matters itself.
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
