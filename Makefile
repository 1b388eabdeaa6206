# Two commands on a machine with only python3 and make:
#   make serve   start the service with the bundled weights (for now: the data demo)
#   make test    install everything and run the test suite
# uv is bootstrapped into .tools/ when it is not on PATH; the environment comes from uv.lock.

UV := $(shell command -v uv 2>/dev/null)
ifeq ($(UV),)
UV := .tools/bin/uv
endif
UV_VERSION := 0.13.9

.PHONY: serve test install demo lint clean

.tools/bin/uv:
	python3 -m venv .tools
	.tools/bin/python -m pip install --quiet "uv==$(UV_VERSION)"

.venv/.installed: pyproject.toml uv.lock | $(UV)
	$(UV) sync --locked --all-extras
	@touch $@

install: .venv/.installed

serve: install
	$(UV) run --locked --no-sync cervixqc demo

demo: serve

test: install
	$(UV) run --locked --no-sync pytest

clean:
	rm -rf .venv .tools .cache .pytest_cache .hypothesis
