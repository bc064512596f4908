# Conveniences; the README's two commands need none of this.
PYTHON ?= python

.PHONY: test chaos chaos-quick bench

test:
	$(PYTHON) -m pytest

chaos:  # every scenario at full size: the reliability scoreboard
	$(PYTHON) -m tests.chaos

chaos-quick:
	$(PYTHON) -m tests.chaos --quick

bench:
	$(PYTHON) -m bench
