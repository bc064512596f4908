"""The bridge process: locks app_jobs jobs and hands them to Celery."""

from lqjobs.bridge.loop import Bridge, new_worker_id
from lqjobs.bridge.publisher import CeleryPublisher, Publisher

__all__ = ["Bridge", "CeleryPublisher", "Publisher", "new_worker_id"]
