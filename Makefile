# The two commands of the README: `make demo` and `make test`. Both do their own set-up.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
FOOLBOX_DIR := tests/.data/foolbox

.PHONY: setup demo test test-fast bench results clean

setup: $(VENV)/.installed $(FMNIST) $(FOOLBOX_DIR)/.done

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

# Embedded default data: Fashion-MNIST from Debian's dataset-fashion-mnist (real images, 60k/10k).
$(FMNIST):
	@if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist

# 20 real ImageNet JPEGs (odd sizes, EXIF) shipped as data files in the foolbox wheel; read, never imported.
$(FOOLBOX_DIR)/.done: $(VENV)/.installed
	mkdir -p $(FOOLBOX_DIR)
	$(PY) -m pip download -q --no-deps -d $(FOOLBOX_DIR)/wheel foolbox==3.3.4
	$(PY) -c "import zipfile,os; z=zipfile.ZipFile('$(FOOLBOX_DIR)/wheel/foolbox-3.3.4-py3-none-any.whl'); \
	[open(os.path.join('$(FOOLBOX_DIR)', os.path.basename(n)), 'wb').write(z.read(n)) for n in z.namelist() \
	 if n.startswith('foolbox/data/imagenet_') and n.endswith('.jpg')]"
	rm -rf $(FOOLBOX_DIR)/wheel
	touch $@

demo: setup
	$(PY) -m pipeline.demo

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

bench: setup
	$(PY) bench/stage1.py
	$(PY) bench/stage2.py

# Every experiment suite on the embedded data (CPU, resumable; 2.5 hours on 2 cores, phases in docs/DESIGN.md);
# rewrites RESULTS.md and results/.
results: setup
	$(PY) -m pipeline.experiments all

clean:
	rm -rf $(VENV) label_banks runs data demo_out tests/.data
