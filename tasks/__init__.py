"""lqjobs' Celery side. ``celery -A tasks worker`` finds the app in :mod:`tasks.celery`;
importing this package has no side effects."""
