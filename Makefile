# Two commands on a machine with only python3 and make:
#   make serve   start the service with the bundled weights (weights/), API key in .cache/api-key
#   make test    install everything and run the test suite (what CI runs: .ci/run)
# uv is bootstrapped into .tools/ when it is not on PATH; the environment comes from uv.lock.
# The Dockerfile installs with the same target: make install SYNC_FLAGS="--no-dev".

UV := $(shell command -v uv 2>/dev/null)
ifeq ($(UV),)
UV := .tools/bin/uv
endif
UV_VERSION := 0.13.9
SYNC_FLAGS ?= --all-extras
API_KEY_FILE ?= .cache/api-key

.PHONY: serve test install weights demo clean image-check

.tools/bin/uv:
	python3 -m venv .tools
	.tools/bin/python -m pip install --quiet "uv==$(UV_VERSION)"

.venv/.installed: pyproject.toml uv.lock | $(UV)
	$(UV) sync --locked $(SYNC_FLAGS)
	@touch $@

install: .venv/.installed

$(API_KEY_FILE):
	@mkdir -p $(dir $@)
	@python3 -c "import secrets; print(secrets.token_urlsafe(32))" > $@
	@chmod 600 $@

serve: install $(API_KEY_FILE)
	@echo "cervixqc: API key in $(API_KEY_FILE) (send it as X-API-Key); docs at http://127.0.0.1:8000/docs"
	CERVIXQC_API_KEYS_FILE=$${CERVIXQC_API_KEYS_FILE:-$(API_KEY_FILE)} $(UV) run --locked --no-sync cervixqc serve

test: install
	$(UV) run --locked --no-sync pytest

# Retrains the bundled default weights on CPU from the listed real photos, hard negatives and
# synthetic scenes: MIRRORS=<folder of repository snapshots> make weights (see weights/README.md).
weights: install
	UV=$(UV) bash weights/recipe.sh

demo: install
	$(UV) run --locked --no-sync cervixqc demo

# The deployment checked for real with docker or podman (not part of `make test`: ~10 min, 13 GB of
# images): builds both tags, runs them, and the compose cpu profile through a SIGKILL mid-job.
# Output and timings: README, Deployment at a screening site. IMAGE_CHECK_NO_CACHE=1 times a full build.
image-check:
	bash tests/deploy/image_check.sh

clean:
	rm -rf .venv .tools .cache .pytest_cache .hypothesis
