# Two commands on a machine with only python3 and make:
#   make serve   start the service with the bundled weights (weights/), API key in .cache/api-key
#   make test    install everything and run the test suite (what CI runs: .ci/run)
# uv is bootstrapped into .tools/ when it is not on PATH; the environment comes from uv.lock.
# The Dockerfile installs with the same target: make install SYNC_FLAGS="--no-dev --no-editable".

UV := $(shell command -v uv 2>/dev/null)
ifeq ($(UV),)
UV := .tools/bin/uv
endif
UV_VERSION := 0.13.9
SYNC_FLAGS ?= --all-extras
API_KEY_FILE ?= .cache/api-key

.PHONY: serve test install browser weights demo clean image-check

.tools/bin/uv:
	python3 -m venv .tools
	.tools/bin/python -m pip install --quiet "uv==$(UV_VERSION)"

# --compile-bytecode: every test process, conversion child and service start reads compiled
# bytecode even where PYTHONDONTWRITEBYTECODE=1 keeps Python from writing its own. On a 2-core
# machine with it set (2026-12-01): importing torch + torchvision 15-18 s -> 7-8 s, `make serve`
# ready 21-23 s -> 9-10 s, the suite 1,163 s -> 857 s (790 s with our own modules compiled as
# well and the conversion tests sharing one conversion). Costs 25-45 s of install once; the
# Dockerfile sets it too (UV_COMPILE_BYTECODE). COMPILE_BYTECODE= (empty) skips it: the
# Dockerfile's test builds an environment to start one service from, where it was 35 of the
# install's 36 s.
COMPILE_BYTECODE ?= --compile-bytecode
.venv/.installed: pyproject.toml uv.lock | $(UV)
	$(UV) sync --locked $(COMPILE_BYTECODE) $(SYNC_FLAGS)
	@touch $@

install: .venv/.installed

# Our own modules as bytecode too, before each serve and test run (a second when nothing
# changed), for the same reason as --compile-bytecode above: the suite starts dozens of Python
# processes (servers, CLI children, conversions, Ray workers).
COMPILE_OURS = $(UV) run --locked --no-sync python -m compileall -q models pipelines service

$(API_KEY_FILE):
	@mkdir -p $(dir $@)
	@python3 -c "import secrets; print(secrets.token_urlsafe(32))" > $@
	@chmod 600 $@

# The keys a site sets itself (CERVIXQC_API_KEYS or CERVIXQC_API_KEYS_FILE) replace the generated
# one: adding its file besides kept the old key working after a site had set its own (an audit).
serve: install $(API_KEY_FILE)
	@$(COMPILE_OURS)
	@url="http://$${CERVIXQC_HOST:-127.0.0.1}:$${CERVIXQC_PORT:-8000}"; \
	if [ -n "$${CERVIXQC_API_KEYS:-}$${CERVIXQC_API_KEYS_FILE:-}" ]; then \
	  echo "cervixqc: API keys from CERVIXQC_API_KEYS(_FILE); $(API_KEY_FILE) is not read; docs at $$url/docs"; \
	  exec $(UV) run --locked --no-sync cervixqc serve; \
	fi; \
	echo "cervixqc: API key in $(API_KEY_FILE) (send it as X-API-Key); docs at $$url/docs"; \
	CERVIXQC_API_KEYS_FILE=$(API_KEY_FILE) exec $(UV) run --locked --no-sync cervixqc serve

# The browser tests drive Debian's Chromium through Playwright (tests/browser.py) and Debian's
# Firefox ESR through the WebDriver BiDi protocol built into Firefox (tests/firefox_bidi.py; no
# geckodriver). Playwright's own browser download and geckodriver's need hosts this network does
# not reach, Debian's mirrors it does. libjpeg-turbo's jpegtran makes the arithmetic-coded
# JPEG of the decoder's test (no Python library writes one). Installed here only when missing, since CI runs `make
# test` on a fresh machine (as root; sudo is used otherwise). CERVIXQC_CHROMIUM and
# CERVIXQC_FIREFOX point the tests at other builds instead.
CHROMIUM := $(or $(CERVIXQC_CHROMIUM),/usr/bin/chromium)
FIREFOX := $(or $(CERVIXQC_FIREFOX),/usr/bin/firefox-esr)
browser:
	@missing=; \
	for spec in "chromium $(CHROMIUM) /usr/bin/chromium CERVIXQC_CHROMIUM" \
	            "firefox-esr $(FIREFOX) /usr/bin/firefox-esr CERVIXQC_FIREFOX" \
	            "libjpeg-turbo-progs /usr/bin/jpegtran /usr/bin/jpegtran -"; do \
	  set -- $$spec; \
	  test -x "$$2" && continue; \
	  if [ "$$2" != "$$3" ]; then echo "$$4=$$2 is not an executable file" >&2; exit 1; fi; \
	  missing="$$missing $$1"; \
	done; \
	[ -z "$$missing" ] && exit 0; \
	if [ "$$(id -u)" = 0 ]; then SUDO=; \
	elif command -v sudo >/dev/null 2>&1; then SUDO="sudo"; \
	else echo "The browser tests need$$missing: as root run 'apt-get install$$missing' (Debian/Ubuntu)," \
	  "or set CERVIXQC_CHROMIUM / CERVIXQC_FIREFOX to the browsers' binaries" >&2; exit 1; fi; \
	echo "Installing Debian's$$missing for the browser tests (apt-get)"; \
	$$SUDO apt-get update -qq && \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null || { \
	  echo "Installing$$missing with apt-get failed: run 'apt-get install$$missing' as root" >&2; exit 1; }

test: install browser
	$(COMPILE_OURS) tests
	$(UV) run --locked --no-sync pytest

# Retrains the bundled default weights on CPU from the listed real photos, hard negatives and
# synthetic scenes: MIRRORS=<folder of repository snapshots> make weights (see weights/README.md).
# Beyond python3 and make it needs git, to read the snapshots.
# MIRRORS checked before the install: a mistyped one waited out a whole install to be refused
weights:
	@test -n "$$MIRRORS" || { echo "error: set MIRRORS to the folder of repository snapshots (see the top of weights/recipe.sh)" >&2; exit 2; }
	@test -d "$$MIRRORS" || { echo "error: MIRRORS=$$MIRRORS is not a folder (of repository snapshots: see the top of weights/recipe.sh)" >&2; exit 2; }
	@$(MAKE) --no-print-directory install
	UV=$(UV) bash weights/recipe.sh

demo: install
	$(UV) run --locked --no-sync cervixqc demo

# The deployment checked for real with docker or podman (not part of `make test`: ~14 min, 13 GB of
# images): builds both tags, runs them, and the compose cpu profile through a SIGKILL mid-job.
# Output and timings: README, Deployment at a screening site. IMAGE_CHECK_NO_CACHE=1 times a full build.
image-check:
	bash tests/deploy/image_check.sh

# The installed environment, the test caches and our modules' bytecode (COMPILE_OURS) only.
# .cache/ stays: by default it holds the service's state (jobs.sqlite, job results, review
# decisions, quarantine copies, the session secret), the API key and `make weights`' extracted
# photos and trained runs; `make clean` took all of them with it (an audit). Remove what you
# mean to by hand.
clean:
	rm -rf .venv .tools .pytest_cache .hypothesis
	find models pipelines service tests weights -name __pycache__ -type d -prune -exec rm -rf {} + 2>/dev/null || true
