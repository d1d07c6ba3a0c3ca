"""Logging set-up: plain text or one JSON object per line. Nothing here may log PHI; callers log UIDs and
AE titles only."""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone


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
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.captureWarnings(True)  # warnings.warn output goes through the same (JSON) handler
    # pynetdicom's INFO/DEBUG output can include dataset dumps; keep it to warnings.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    # APScheduler logs every interval run at INFO; the scheduler role logs what matters itself.
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
