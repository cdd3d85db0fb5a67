# prunekit: set-up, tests, demo and benchmarks.
# Every target that needs the virtualenv builds it first (once; again when pyproject.toml changes).

PYTHON     ?= python3
VENV       ?= .venv
# torch is a range; pin it with e.g. make venv TORCH_PKGS="torch==2.14.1 torchvision==0.29.1"
TORCH_PKGS ?= torch>=2.3 torchvision>=0.18
PYTEST_ARGS ?= -n 2

PY    := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR := out/demo

.PHONY: venv test test-slow demo bench clean distclean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install $(foreach p,$(TORCH_PKGS),'$(p)')
	$(PY) -m pip install -e '.[test]'
	touch $@

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS) -m slow

# Report and channel graph of the reference U-Net (random weights, built from prunekit.zoo:unet).
demo: $(STAMP)
	mkdir -p $(DEMO_DIR)
	$(PY) -c "import torch; from prunekit.zoo import unet; torch.manual_seed(0); torch.save(unet().state_dict(), '$(DEMO_DIR)/unet.pt')"
	$(VENV)/bin/prunekit report $(DEMO_DIR)/unet.pt --builder prunekit.zoo:unet --input-shape 1,3,256,256
	$(VENV)/bin/prunekit graph $(DEMO_DIR)/unet.pt --builder prunekit.zoo:unet --input-shape 1,3,256,256 --dot $(DEMO_DIR)/unet_groups.dot

bench: $(STAMP)
	@test -f benchmarks/run.py || { echo "benchmarks/run.py does not exist yet."; exit 1; }
	$(PY) benchmarks/run.py

clean:
	rm -rf out .pytest_cache .hypothesis build *.egg-info
	find . -name __pycache__ -type d -not -path './$(VENV)/*' -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
