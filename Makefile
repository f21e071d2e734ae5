# Two commands a newcomer runs: `make demo` (the main job end to end) and `make test` (every test).
# Each installs what it needs into this folder (.venv, .tools) and starts and stops its own services.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
AZURITE_VERSION := 3.37.0
AZURITE := .tools/node_modules/.bin/azurite-blob
PYTEST_ARGS ?=
# pytest worker processes for `make test` (pytest-xdist): each test waits part of its time on the services and
# workers it starts, so two more processes than cores keeps the cores busy (on 2 cores, 4 processes ran the
# suite in 15:46 where 3 took 19:22, the same tests). TEST_JOBS=0 runs in one process (serially).
TEST_JOBS ?= $(shell echo $$(( $$(nproc 2>/dev/null || echo 1) + 2 )))

.PHONY: test demo bench install tools guest clean help console-screenshots bytecode

help:
	@echo "make demo   - run the whole engine end to end on this machine (installs what it needs)"
	@echo "make test   - lint (ruff) and run every test (installs what it needs, starts its own Azurite/Redis)"
	@echo "make guest  - build the test guest (a real Linux VM for QEMU) into $(GUEST)"
	@echo "make bench  - run the benchmarks and write docs/benchmarks.md (not part of make test)"
	@echo "make console-screenshots - the web console's pages as docs/console/*.png (its browser tests, in chromium)"

# The package has two compiled parts (sites/storage/xts_build.py: OpenSSL's AES-XTS; datapath/writepath_build.py:
# the NBD write path's receiving and log records), built by pip through setup.py: a C compiler and the headers
# of libc, OpenSSL and Python first.
$(VENV)/.installed: pyproject.toml setup.py sites/storage/xts_build.py datapath/writepath_build.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@PYTHON=$(PY) bash scripts/ensure-tools.sh gcc libc-headers openssl-headers python-headers libcrypto
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed $(AZURITE)

# The project's compiled bytecode, written once here: every test starts hundreds of Python processes
# (workers, beat, the asr CLI), and where PYTHONDONTWRITEBYTECODE is set (as on this machine kind) each of
# them would compile our ~150 modules from source again, about 0.3 s of CPU per process.
bytecode: $(VENV)/.installed
	$(PY) -m compileall -q worker.py api datapath migrations models sites tasks workflows tests benchmarks

$(AZURITE):
	@command -v npm >/dev/null || { echo "npm is needed to install Azurite: install Node.js 18+ and npm (Debian: apt-get install nodejs npm)"; exit 1; }
	mkdir -p .tools
	npm install --prefix .tools --no-audit --no-fund --loglevel=error azurite@$(AZURITE_VERSION)
	test -x $@

# Outside tools the tests and benchmarks use as independent checks and peers.
tools:
	@bash scripts/ensure-tools.sh

# The test guest, a real Linux VM QEMU boots as a protected VM, built from Debian packages (kernel via
# apt-get download, busybox-static; its bootable disk with dosfstools, mtools and syslinux); see
# docs/runtime.md. Skipped quickly when up to date.
GUEST := .tools/guest

guest: $(VENV)/.installed
	@bash scripts/ensure-tools.sh busybox qemu-system-x86_64 mkfs.ext4 e2fsck mkfs.fat mcopy syslinux
	$(PY) -m sites.guest.build --out $(GUEST)

# Lint first (ruff, configured in pyproject.toml): a finding fails the run before the tests start.
test: install tools guest bytecode
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -n $(TEST_JOBS) $(PYTEST_ARGS)

# The screenshots docs/console.md shows: the console's browser tests, saving each page they pass through.
console-screenshots: install
	@bash scripts/ensure-tools.sh chromium chromedriver redis-server
	ASR_CONSOLE_SCREENSHOTS=docs/console $(VENV)/bin/pytest -q -n 0 tests/test_console_browser.py

# The demo starts its own redis-server on a free port (installed by scripts/ensure-tools.sh when missing
# and the machine allows it); Azurite only for `DEMO_ARGS="--backend azure"` or `both`. The outside tools of the
# tests (qemu-img, rsync) are not needed; the real guest's are (the guest target installs them).
DEMO_AZURITE = $(if $(or $(findstring azure,$(DEMO_ARGS)),$(findstring both,$(DEMO_ARGS))),$(AZURITE))

demo: $(VENV)/.installed $(DEMO_AZURITE) guest bytecode
	@bash scripts/ensure-tools.sh redis-server
	$(VENV)/bin/asr demo --workdir demo-work $(DEMO_ARGS)

bench: install tools bytecode
	$(PY) -m benchmarks.run $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .tools .pytest_cache demo-work bench-work
