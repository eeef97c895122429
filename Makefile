# `make test` and `make demo` build their own environment from this repository's files.
PYTHON ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)

.PHONY: test demo env lint browser

env: $(STAMP) browser

# The demo's browser test drives Debian's Chromium (no browser download at run time); box labels in Chinese need a
# CJK font (Debian's WenQuanYi Micro Hei), for saved images and for the browser alike.
SYSTEM_PACKAGES := chromium chromium-driver fonts-wqy-microhei
browser:
	@{ test -x /usr/bin/chromium && test -f /usr/share/fonts/truetype/wqy/wqy-microhei.ttc; } \
		|| { test "$$(id -u)" = 0 && { apt-get install -y -q $(SYSTEM_PACKAGES) >/dev/null \
		|| { apt-get update -q >/dev/null && apt-get install -y -q $(SYSTEM_PACKAGES) >/dev/null; }; }; } \
		|| echo "warning: $(SYSTEM_PACKAGES) could not be installed; the browser test will fail and Chinese labels will be boxes"

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
