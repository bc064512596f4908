"""lqjobs: run the LaunchQL / Constructive app_jobs Postgres queue on Celery."""

__version__ = "0.1.0"
