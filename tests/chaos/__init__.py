"""The chaos suite: real lqjobs processes under seeded faults, judged by an oracle.

``python -m tests.chaos`` runs every scenario and prints the scoreboard;
``tests/chaos/test_chaos.py`` runs a quick subset inside ``pytest``.
"""
