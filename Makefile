# ds2net: `make demo` runs the main job, `make test` runs the whole suite. Both install first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.ds2net-installed
export PYTHONHASHSEED := 0

.PHONY: install demo bench gpu-wheels mutants mutmut test export clean-nbs readme check-export check-clean check-readme lint-imports pytest nbtest run-nb docs-env docs docs-serve

install: $(STAMP)

# Re-runs only when the pinned stack (settings.ini) or setup.py changed since the last install.
$(STAMP): settings.ini setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: install
	$(BIN)/ds2net demo

# Issue 9's CPU benchmark: the authors' training step against the library's default one, at full size (JSON).
BENCH_ARGS ?= --device cpu --encoder pvt_v2_b2 --size 352 --bs 2
bench: install
	$(BIN)/ds2net bench $(BENCH_ARGS) --json outputs/bench/cpu.json

# The wheels tools/gpu_check.sh installs on an offline GPU machine (Python 3.12 there): into the gitignored .whl/
gpu-wheels: install
	$(BIN)/python -m pip download -q --no-deps -d .whl fastai==2.8.7 fastcore==1.14.5 fasttransform==0.0.2 \
	  beartype==0.23.1 fastprogress==1.1.6 fastdownload==0.0.8 captum==0.9.0 torchmetrics==1.9.0 \
	  lightning-utilities==0.15.3 accelerate==1.15.0
	$(BIN)/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl plum-dispatch==2.9.0 psutil==7.2.2

# Mutation testing (CONTRIBUTING.md): not part of `make test`, too slow for CI.
# `make mutants`: a list of deliberate, plausible breakages (tools/mutants.py), each against the tests that should catch it.
mutants: install
	$(BIN)/python tools/mutants.py

# `make mutmut`: mutmut's own mutants of losses, blocks and callbacks, and the score of each (tools/mutmut.sh).
MUTMUT_MODULES ?= losses blocks callbacks
mutmut: install
	test -x $(BIN)/mutmut || $(BIN)/python -m pip install -q mutmut==2.5.1
	tools/mutmut.sh $(MUTMUT_MODULES)

test: install docs-env check-export check-clean check-readme lint-imports pytest nbtest

export: install
	$(BIN)/nbdev_export

clean-nbs: install
	$(BIN)/nbdev_clean

# Execute one notebook in place, stamping each executed cell with its source hash: `make run-nb NB=nbs/06_learner.ipynb`
run-nb: install
	$(BIN)/python tools/run_notebook.py $(NB)

readme: install
	$(BIN)/python tools/readme.py

# 1. the package must be what the notebooks export
check-export: install
	$(BIN)/nbdev_export
	@test -z "$$(git status --porcelain -- ds2net)" || { git status --porcelain -- ds2net; git diff --stat -- ds2net; \
	  echo "ds2net/ is out of step with nbs/: run 'make export' and commit both"; exit 1; }

# 2. notebooks must be clean
check-clean: install
	$(BIN)/nbdev_clean
	@test -z "$$(git status --porcelain -- nbs)" || { git status --porcelain -- nbs; \
	  echo "nbdev_clean changed these notebooks: commit them cleaned"; exit 1; }

check-readme: install
	$(BIN)/python tools/readme.py --check

# 3a. the layers (.importlinter): a lower module never imports a higher one
lint-imports: install
	$(BIN)/lint-imports --no-cache

# 3. pytest (exit code 5, no tests collected, fails the target like any non-zero code)
pytest: install
	$(BIN)/python -m pytest -q tests

# 4. every notebook executes on CPU (cells flagged `#|gpu` or `#|slow` are skipped). One notebook at a time:
#    two at once, each with torch's own threads, ran ten times slower on 2 cores.
# The tutorials run in a real JupyterLab in tests/test_jupyterlab.py (no error, no warning, every figure shown); where
# Chromium is there to run them, nbdev_test leaves them out rather than run them twice.
CHROMIUM ?= $(or $(DS2NET_CHROMIUM),/usr/bin/chromium)
NBTEST_SKIP := $(if $(wildcard $(CHROMIUM)),--skip_folder_re '^([_.]|tutorials$$)',)
nbtest: install
	$(BIN)/nbdev_test --n_workers 1 --timing $(NBTEST_SKIP)

# The docs site (tools/docs.py, nbs/15_docs.ipynb): nbdev's processing in .venv, MkDocs Material + mkdocs-jupyter
# in their own .venv-docs (jupytext, which mkdocs-jupyter pulls in, must stay out of the lab's .venv).
DOCS_VENV  := .venv-docs
DOCS_STAMP := $(DOCS_VENV)/.ds2net-docs-installed
DOCS_PORT  ?= 8000

docs-env: $(DOCS_STAMP)

$(DOCS_STAMP): docs/requirements.txt docs/requirements-nodeps.txt
	test -x $(DOCS_VENV)/bin/python || $(PYTHON) -m venv $(DOCS_VENV)
	$(DOCS_VENV)/bin/python -m pip install -q --upgrade pip
	$(DOCS_VENV)/bin/python -m pip install -q -r docs/requirements.txt
	$(DOCS_VENV)/bin/python -m pip install -q --no-deps -r docs/requirements-nodeps.txt
	touch $(DOCS_STAMP)

# Builds _site/ from the notebooks' committed outputs (nothing is re-executed).
docs: install docs-env
	$(BIN)/python tools/docs.py build --site _site

docs-serve: docs
	@echo "ds2net docs: http://127.0.0.1:$(DOCS_PORT)/index.html  (Ctrl-C stops the server)"
	$(BIN)/python -m http.server $(DOCS_PORT) --bind 127.0.0.1 --directory _site
