PY := .venv/bin/python
PIP := .venv/bin/pip
# Re-install whenever pyproject.toml or constraints.txt changes.
STAMP := .venv/.installed-stamp

.PHONY: venv demo lint test test-slow bench constraints

venv: $(STAMP)

# Pin torch first: an unpinned resolve would pull a multi-GB CUDA build. The rest at the
# versions in constraints.txt, the ones the tests last passed with.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install torch==2.13.0
	$(PIP) install -c constraints.txt -e '.[dev,demo]'
	touch $(STAMP)

# After upgrading packages in .venv and a green `make test`: record their versions.
constraints: venv
	{ sed -n '/^#/p' constraints.txt; $(PIP) freeze --exclude-editable | grep -v '^torch=='; } \
		> constraints.tmp && mv constraints.tmp constraints.txt

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
