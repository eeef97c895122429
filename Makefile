# `make test` and `make demo` build their own environment from this repository's files.
PYTHON ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)

.PHONY: test demo env lint browser

env: $(STAMP) browser

# The demo's browser test drives Debian's Chromium (no browser download at run time).
browser:
	@test -x /usr/bin/chromium || { test "$$(id -u)" = 0 && { apt-get install -y -q chromium chromium-driver >/dev/null \
		|| { apt-get update -q >/dev/null && apt-get install -y -q chromium chromium-driver >/dev/null; }; }; } \
		|| echo "warning: /usr/bin/chromium is missing and could not be installed; the browser test will fail"

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	# torch first, with pyproject's exact pins, so no resolver can pull another build.
	$(VENV)/bin/pip install -q $$(grep -oE '"torch(vision)?==[0-9.]+"' pyproject.toml | tr -d '"')
	$(VENV)/bin/pip install -q -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

lint: env
	$(VENV)/bin/ruff check .

test: env
	$(VENV)/bin/ruff check .
	$(VENV)/bin/python -m pytest tests

demo: env
	$(VENV)/bin/multimodal demo $(DEMO_ARGS)
