PY := .venv/bin/python
PIP := .venv/bin/pip
# Re-install whenever pyproject.toml changes.
STAMP := .venv/.installed-stamp

.PHONY: venv demo lint test test-slow bench

venv: $(STAMP)

# Pin torch first: an unpinned resolve would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[dev,demo]'
	touch $(STAMP)

demo: venv
	.venv/bin/flextron demo

# ruff comes with the dev extra; the rules are in pyproject.toml ([tool.ruff]).
lint: venv
	.venv/bin/ruff check flextron_fx tests benchmarks examples

# Two workers (pytest-xdist), one test file each at a time: most of the suite is
# single-threaded Python (tracing, export), so the second core was idle.
test: venv
	$(PY) -m pytest -q -n 2 --dist loadfile

test-slow: venv
	$(PY) -m pytest -q -m slow

bench: venv
	$(PY) benchmarks/forward_speed.py
