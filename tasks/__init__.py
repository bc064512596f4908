"""``celery -A tasks worker`` in a checkout of this repository finds the app in
:mod:`tasks.celery`; installed code never imports this package (use
``celery -A lqjobs.app``). Importing it has no side effects."""
