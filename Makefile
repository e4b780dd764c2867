# Set-up and checks on a CPU machine (no GPU needed). On a GPU machine with vLLM installed,
# `pip install -e .` is all the plugin needs.
VENV ?= .venv
# The vLLM release the plugin is pinned to; another one can be tried in its own venv, e.g.
# make test VENV=.venv-vllm-0.34 VLLM=0.34.0
VLLM ?= 0.26.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check --no-cache-dir

.PHONY: setup demo test wheel
setup: $(VENV)/.installed

# vLLM's wheel pins the CUDA build of torch; on the CPU its Python code runs on the CPU build,
# so vLLM goes in with --no-deps and the packages it imports come from the requirements file.
$(VENV)/.installed: pyproject.toml .ci/requirements-cpu.txt
	python3 -m venv $(VENV)
	$(PIP) -r .ci/requirements-cpu.txt
	$(PIP) --no-deps vllm==$(VLLM)
	$(PIP) --no-deps --no-build-isolation -e .
	touch $@

demo: setup
	$(VENV)/bin/gqsa-convert --demo out/gqsa-demo --overwrite

test: setup
	$(PY) -m pytest -q

# The sdist and, built from it in a clean folder (no stale build/ can leak in), the wheel, both in
# dist/. .venv's torch is a CPU build, so this wheel is pure Python; the wheel with vllm_gqsa._C
# (sm_80, sm_90a) is built the same way in vLLM's own environment on a CUDA machine:
# pip install build && python -m build --no-isolation
wheel: setup
	$(PY) -m build --no-isolation --outdir dist .
