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
	# the demo's nuclei image and mask ship inside this wheel; only its data files are used
	$(PY) -m pip install --no-deps 'stardist==0.9.2'
	touch $@

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS) -m slow

# Train the reference U-Net on real nuclei tiles, prune it to half its FLOPs with IPAD, fine-tune,
# and print FLOPs, parameters, latency and test IoU before and after (progress on stderr, also when piped).
# It leaves out/demo/unet.pt, config.yaml and the run directory run/ (report.md, trajectory.png, widths.png);
# see the result with: prunekit report out/demo/run
demo: $(STAMP)
	$(VENV)/bin/prunekit demo -o $(DEMO_DIR)

bench: $(STAMP)
	@test -f benchmarks/run.py || { echo "benchmarks/run.py does not exist yet."; exit 1; }
	$(PY) benchmarks/run.py

clean:
	rm -rf out .pytest_cache .hypothesis build *.egg-info
	find . -name __pycache__ -type d -not -path './$(VENV)/*' -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
