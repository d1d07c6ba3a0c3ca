"""Prometheus ``/metrics``, read from the database at scrape time.

Roles are separate processes (and machines), so in-process prometheus-client counters would each see a
fraction of the traffic: the counters live in the ``counters`` table (storage/counters.py, incremented in
the same transaction as the event) and the gauges are computed from the queues, the heartbeats and the
spool's disk when Prometheus scrapes. A custom collector turns them into metric families.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
)
from prometheus_client.registry import Collector

from node.settings import Settings
from node.runtime.status import engine_from_roles, live_roles, spool_disk
from storage.counters import Counters
from storage.db import Database
from storage.status import oldest_pending_seconds, queue_depths

log = logging.getLogger("msknode.metrics")

PREFIX = "msknode"

# counters table name -> (metric name without _total, help, label names)
COUNTERS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "instances_received": ("instances_received", "Instances received, by index outcome (new, duplicate, replaced).", ("outcome",)),
    "received_bytes": ("received_bytes", "Bytes of instances received.", ()),
    "associations": ("associations", "Association requests, by outcome (accepted, rejected) and reject reason.", ("outcome", "reason")),
    "deliveries": ("deliveries", "Result delivery attempts, by outcome (delivered, retry, dead) and destination.", ("outcome", "destination")),
    "heartbeat_failures": ("heartbeat_failures", "Failed heartbeats (kind role) and lease renewals (kind lease), by role; counted once the database answers again.", ("role", "kind")),
}
HISTOGRAMS = {"inference_seconds": "Seconds per engine pass (one batch of frames)."}


class DatabaseCollector(Collector):
    """Builds every family from the database each time it is collected."""

    def __init__(self, settings: Settings, database: Database) -> None:
        self.settings = settings
        self.database = database

    def collect(self) -> Iterator[Any]:
        rows = Counters(self.database).all()
        yield from self.counter_families(rows)
        yield from self.histogram_families(rows)
        yield from self.gauge_families()

    def counter_families(self, rows: list[tuple[str, dict[str, str], float]]) -> Iterator[Any]:
        for key, (name, documentation, label_names) in COUNTERS.items():
            family = CounterMetricFamily(f"{PREFIX}_{name}", documentation, labels=list(label_names))
            for row_name, labels, value in rows:
                if row_name == key:
                    family.add_metric([labels.get(label, "") for label in label_names], value)
            yield family

    def histogram_families(self, rows: list[tuple[str, dict[str, str], float]]) -> Iterator[Any]:
        for key, documentation in HISTOGRAMS.items():
            buckets = sorted(
                ((labels["le"], value) for name, labels, value in rows if name == f"{key}_bucket"),
                key=lambda item: float(item[0]),
            )
            total = next((value for name, _, value in rows if name == f"{key}_sum"), 0.0)
            family = HistogramMetricFamily(f"{PREFIX}_{key}", documentation)
            if buckets:
                family.add_metric([], buckets, total)
            yield family

    def gauge_families(self) -> Iterator[Any]:
        depth = GaugeMetricFamily(f"{PREFIX}_queue_depth", "Items in each queue, by state.", labels=["queue", "state"])
        for queue, states in queue_depths(self.database).items():
            for state, count in sorted(states.items()):
                depth.add_metric([queue, state], count)
        yield depth

        oldest = GaugeMetricFamily(f"{PREFIX}_oldest_pending_seconds",
                                   "Age of the oldest waiting item of each queue (0 when empty).", labels=["queue"])
        for queue, seconds in oldest_pending_seconds(self.database).items():
            oldest.add_metric([queue], seconds)
        yield oldest

        disk = spool_disk(self.settings)
        yield GaugeMetricFamily(f"{PREFIX}_spool_free_bytes", "Free bytes on the spool's filesystem.",
                                value=disk["free_bytes"])
        yield GaugeMetricFamily(f"{PREFIX}_spool_min_free_bytes", "The storage.min_free_disk_mb watermark in bytes.",
                                value=disk["min_free_bytes"])

        roles = live_roles(self.database)
        alive = GaugeMetricFamily(f"{PREFIX}_role_processes_alive", "Role processes with a recent heartbeat.",
                                  labels=["role"])
        counts = {role: 0 for role in ("receiver", "scheduler", "worker", "sender", "web")}
        for row in roles:
            if row["alive"]:
                counts[row["role"]] = counts.get(row["role"], 0) + 1
        for role, count in sorted(counts.items()):
            alive.add_metric([role], count)
        yield alive

        engine = engine_from_roles(roles)
        info = InfoMetricFamily(f"{PREFIX}_engine", "The engine a live worker has loaded.",
                                labels=["backend", "precision", "device", "model"])
        if engine is not None:
            info.add_metric(
                [str(engine.get(k, "")) for k in ("backend", "precision", "device", "model")], {}
            )
        yield info


def render_metrics(settings: Settings, database: Database) -> tuple[bytes, str]:
    """The Prometheus text exposition and its content type."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DatabaseCollector(settings, database))
    return generate_latest(registry), CONTENT_TYPE_LATEST
