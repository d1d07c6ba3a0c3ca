"""Fault-injection points for the crash-consistency tests (in the spirit of mercure's DO_ERROR).

``MSKNODE_FAULTS="worker.before_finish=sleep:5,sender.before_send=sleep:2"`` makes the named points pause,
so a test can kill a role at a known moment. Unset (always, in production) they cost one dict lookup.
"""

from __future__ import annotations

import logging
import os
import time

log = logging.getLogger("msknode.faults")


def _parse(spec: str) -> dict[str, float]:
    points: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, action = part.partition("=")
        kind, _, value = action.partition(":")
        if kind == "sleep":
            points[name] = float(value or 1)
    return points


_POINTS = _parse(os.environ.get("MSKNODE_FAULTS", ""))


def fault_point(name: str) -> None:
    delay = _POINTS.get(name)
    if delay:
        log.warning("fault point %s: sleeping %.1f s", name, delay)
        time.sleep(delay)
