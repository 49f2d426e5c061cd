# make run   -> set up .venv if needed, then launch the dashboard on http://127.0.0.1:8501
# make test  -> same set-up, then the whole test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PORT ?= 8501

.PHONY: run test setup browser demo bench clean

setup: $(STAMP)

$(STAMP): requirements.txt requirements-nodeps.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -r requirements-nodeps.txt
	@# torchvision's PyPI build (pulled in by some peers) breaks `import transformers` here
	-$(PY) -m pip uninstall --quiet --yes torchvision 2>/dev/null
	touch $(STAMP)

run: $(STAMP)
	$(PY) -m streamlit run app.py --server.address 127.0.0.1 --server.port $(PORT) \
		--server.headless true --browser.gatherUsageStats false

# the browser test needs Debian's chromium + chromium-driver: installed here when missing
browser:
	bash scripts/ensure_browser.sh

test: $(STAMP) browser
	$(PY) -m pytest -q

demo: $(STAMP)
	$(PY) -m stride_viz demo

bench: $(STAMP)
	$(PY) benchmarks/engine.py

clean:
	rm -rf $(VENV)
