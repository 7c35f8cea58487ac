# metalabel: set-up, tests, demo, benchmarks and data. Every target that runs Python depends on `setup`.
SHELL := /bin/sh
PY := .venv/bin/python
# The local wheels on the development machines; override for another CUDA build, e.g.
#   make setup TORCH_SPEC="torch==2.5.1 torchvision==0.20.1 --index-url https://download.pytorch.org/whl/cu121"
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1

.PHONY: setup test demo demo_maxl bench bench_maxl download_cifar100 download_cifar10

setup: .venv/.installed

.venv/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

test: setup
	$(PY) -m pytest tests

# ---- MAXL ---------------------------------------------------------------------------------------------------
DEMO_MAXL := dataset=digits model.width_mult=0.25 epochs=15 device=cpu num_workers=0 progress=false overwrite=true

demo: demo_maxl

demo_maxl: setup
	for method in single human maxl; do \
	  $(PY) maxl_train.py method=$$method $(DEMO_MAXL) hydra.run.dir=logs/demo/maxl/$$method || exit 1; done
	$(PY) -m engine.report logs/demo/maxl/single logs/demo/maxl/human logs/demo/maxl/maxl \
	  --metric test/acc --plot logs/demo/maxl/test_accuracy.png

bench: bench_maxl

bench_maxl: setup
	$(PY) bench/bench_maxl.py $(BENCH_ARGS)

download_cifar100: setup
	$(PY) -m dataset.cifar100 --download

download_cifar10: setup
	$(PY) -m dataset.cifar100 --download --cifar10
