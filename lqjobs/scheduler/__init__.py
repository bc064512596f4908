"""The scheduler: turns ``app_jobs.scheduled_jobs`` into jobs on their schedules.

``service`` is the loop (claim rows, keep their timers, run ticks); ``timers``
holds one timer per claimed row; ``rules`` parses ``schedule_info`` as the Node
runtime's node-schedule reads it; ``report`` judges rows for ``lqjobs schedules``.
"""
