"""The bridge's Prometheus samples: its counters and the queue gauges, as ``Sample``s.

Pure: :meth:`lqjobs.bridge.loop.Bridge.metrics` reads the numbers (the counters under
their lock, the gauges from Postgres) and this module names and describes them.
"""

from __future__ import annotations

from collections.abc import Mapping

from lqjobs.db.reads import QueueGauges
from lqjobs.metrics import Sample

# (sample name, counter key, help) of the bridge's own counters.
COUNTERS = (
    ("jobs_locked_total", "locked", "Jobs locked with get_job."),
    ("jobs_dispatched_total", "dispatched", "Jobs published to Celery."),
    ("jobs_oversized_total", "oversized", "Jobs failed for a too large payload."),
    ("jobs_unreadable_total", "unreadable", "Job rows lqjobs could not read, failed."),
    ("jobs_abandoned_total", "abandoned", "Leases expired on a last attempt, failed."),
    ("bridge_failures_total", "failures", "Passes failed on the database or broker."),
    ("jobs_republished_total", "republished", "Leases re-published after a broker restart."),
    ("broker_restarts_total", "broker_restarts", "Broker restarts seen (run_id changes)."),
)


def samples(
    worker_id: str, counts: Mapping[str, int], in_flight: int, gauges: QueueGauges
) -> list[Sample]:
    """Counters of one bridge incarnation, its in-flight count and the queue gauges."""
    labels = (("worker_id", worker_id),)
    return [
        *(
            Sample(name, "counter", help, float(counts.get(key, 0)), labels)
            for name, key, help in COUNTERS
        ),
        Sample("jobs_in_flight", "gauge", "Locked by this bridge, not settled.", in_flight, labels),
        Sample("jobs_ready", "gauge", "Ready jobs of served tasks.", gauges.ready),
        Sample(
            "oldest_ready_job_age_seconds",
            "gauge",
            "Age of the oldest ready job of a served task.",
            gauges.oldest_ready_age_seconds,
        ),
        Sample(
            "jobs_unroutable",
            "gauge",
            "Ready jobs of tasks no bridge here serves.",
            gauges.unroutable,
        ),
        Sample(
            "jobs_failed_permanently",
            "gauge",
            "Jobs parked after max_attempts.",
            gauges.failed_permanently,
        ),
        Sample(
            "jobs_locked_last_attempt",
            "gauge",
            "Jobs locked on their last attempt.",
            gauges.locked_last_attempt,
        ),
        Sample(
            "jobs_abandoned",
            "gauge",
            "Jobs locked past the lease expiry on their last attempt (swept by a bridge).",
            gauges.abandoned,
        ),
    ]
