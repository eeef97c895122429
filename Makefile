# `make test` and `make demo` build their own environment from this repository's files.
PYTHON ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)

.PHONY: test demo env lint

env: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	# torch first and exactly pinned, from the same pins as pyproject, so nothing else can pull another build.
	$(VENV)/bin/pip install -q torch==2.14.1 torchvision==0.29.1
	$(VENV)/bin/pip install -q -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

lint: env
	$(VENV)/bin/ruff check .

test: env
	$(VENV)/bin/ruff check .
	$(VENV)/bin/python -m pytest tests

demo: env
	$(VENV)/bin/multimodal demo
