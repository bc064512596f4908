"""The operator's tools: the ``lqjobs`` command and what only it uses (doctor,
roles, migrate, the one-laptop dev stack with its embedded servers and example
functions). Nothing outside ops/ imports from here, but for tests and the bench."""
