# Conveniences; the README's two commands need none of this.
PYTHON ?= python

.PHONY: test chaos chaos-quick bench bench-quick

test:
	$(PYTHON) -m pytest

chaos:  # every scenario at full size: the reliability scoreboard
	$(PYTHON) -m tests.chaos

chaos-quick:
	$(PYTHON) -m tests.chaos --quick

bench:
	$(PYTHON) -m bench

bench-quick:  # every row once, on the stock and the embedded server
	$(PYTHON) -m bench --quick --postgres both
