# metalabel: set-up, tests, demo, benchmarks and data. Every target that runs Python depends on `setup`.
SHELL := /bin/sh
PY := .venv/bin/python
# PyPI's torch 2.14.1 wheels are CUDA 13.0 builds (NVIDIA driver >= 580; they also run without a GPU). For an
# older driver, or a CPU-only torch, on a fresh .venv (rm -rf .venv), e.g. (README, "Set-up"):
#   make setup TORCH_SPEC="torch==2.6.0 torchvision==0.21.0 --index-url https://download.pytorch.org/whl/cu118"
# The spec a .venv was made with is kept in .venv/.torch_spec and used again when pyproject.toml changes, unless
# TORCH_SPEC is given (on the command line or in the environment): a spec other than the recorded one reinstalls.
TORCH_DEFAULT := torch==2.14.1 torchvision==0.29.1
TORCH_RECORDED := $(strip $(shell cat .venv/.torch_spec 2>/dev/null))
ifeq ($(origin TORCH_SPEC),undefined)
TORCH_SPEC := $(or $(TORCH_RECORDED),$(TORCH_DEFAULT))
else ifneq ($(strip $(TORCH_SPEC)),$(TORCH_RECORDED))
.venv/.installed: FORCE
endif

.PHONY: setup test demo demo_maxl demo_mela pipeline bench bench_maxl bench_mela gpu_check download_cifar100 \
  download_cifar10 FORCE
FORCE:

setup: .venv/.installed

.venv/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[test]'
	echo '$(strip $(TORCH_SPEC))' > .venv/.torch_spec
	touch $@

# Two test processes with one thread each; the 15 slowest tests are listed at the end. Bytecode is cached even where
# the environment says not to (PYTHONDONTWRITEBYTECODE): each of the suite's processes would compile the sources again.
test: setup
	PYTHONDONTWRITEBYTECODE= OMP_NUM_THREADS=1 $(PY) -m pytest -n 2 --dist loadfile --durations=15 tests

# ---- MAXL ---------------------------------------------------------------------------------------------------
DEMO_MAXL := dataset=digits model.width_mult=0.25 epochs=15 device=cpu num_workers=0 progress=false

demo: demo_maxl demo_mela

demo_maxl: setup
	for method in single human maxl; do \
	  $(PY) maxl_train.py method=$$method $(DEMO_MAXL) hydra.run.dir=logs/demo/maxl/$$method || exit 1; done
	$(PY) -m tools.report logs/demo/maxl/single logs/demo/maxl/human logs/demo/maxl/maxl \
	  --metric test/acc_last --metric test/acc_best --metric test/acc_last5_mean --plot logs/demo/maxl/test_accuracy.png

bench: bench_maxl bench_mela bench_data   # options: BENCH_MAXL_ARGS, BENCH_MELA_ARGS, BENCH_DATA_ARGS, SAVE, BASELINE
# SAVE=FILE keeps the MAXL and MeLa figures in FILE; BASELINE=FILE (an earlier SAVE on this machine) prints each figure
# next to that run's with their ratio, flagging slowdowns over 10%:  make bench BASELINE=figures.json
BENCH_FIGURES = $(if $(SAVE),--save $(SAVE)) $(if $(BASELINE),--baseline $(BASELINE))

bench_maxl: setup
	$(PY) bench/bench_maxl.py $(BENCH_FIGURES) $(BENCH_MAXL_ARGS)

# ---- MeLa ---------------------------------------------------------------------------------------------------
# The whole chain on one dataset, then meta_eval of every stage:  make pipeline DATASET=miniImageNet NAME=... ARGS='...'
# ARGS go to every step that has the key; SCRIPT:key=value to one step (e.g. fine_tune:epochs=2). Runs are named
# <NAME>_<dataset>_<model>_<step>_s<seed>; the same command again skips the finished steps. DATASET: synthetic_fs
# unless given; learn_labeler's K, train_db_size and no_replacement follow the dataset (its labeler: node).
pipeline: setup
	$(PY) -m tools.study pipeline

# digits: classes 0-3 / 4-6 / 7-9, so 3-way tasks; the labeler needs more tasks than K / n_ways, hence random ones.
DEMO_MELA := model.width_mult=0.5 device=cpu num_workers=0 progress=false n_ways=3 val_n_ways=3 \
  test_db_size=300 learn_meta_repr:epochs=20 learn_labeler:epochs=6 sup_baseline:epochs=6 \
  learn_labeler:no_replacement=false learn_labeler:train_db_size=20 K=30
demo_mela: setup
	$(PY) -m tools.pipeline --dataset digits --name demo -- $(DEMO_MELA)

bench_mela: setup
	$(PY) bench/bench_mela.py $(BENCH_FIGURES) $(BENCH_MELA_ARGS)

# Every script for a few steps at full width in fp32, bf16 and compiled on one CUDA GPU, checked to have run there,
# then the benches: logs/gpu_check/gpu_check.md and .json, in under 8 minutes (docs/benchmarks.md). Options through
# GPU_CHECK_ARGS (python bench/gpu_check.py --help), e.g. GPU_CHECK_ARGS="--out logs/gpu_check_h200".
gpu_check: setup
	$(PY) bench/gpu_check.py $(GPU_CHECK_ARGS)

download_cifar100: setup
	$(PY) -m tools.download cifar100

download_cifar10: setup
	$(PY) -m tools.download cifar10

# ---- MeLa data ----------------------------------------------------------------------------------------------
# The workspace and the original archives: WORKSPACE defaults to ./workspace (unset or empty; a trailing slash is fine);
# METALABEL_MIRROR=URL fetches <URL>/<archive>.tar.gz instead of the original figshare addresses.
MELA_WORKSPACE = $(patsubst %/,%,$(or $(WORKSPACE),./workspace))
MELA_DATA_DIR = $(MELA_WORKSPACE)/metaL_data
MELA_DOWNLOADS := download_aircraft download_cu_birds download_vgg_flower download_miniimagenet download_mini60 \
  download_tieredimagenet download_tiered780
# DOWNLOAD_ARGS='--sha256 NAME=HEX --checksums FILE' pins the archives' checksums (docs/data_downloads.md).
DOWNLOAD := $(PY) -m tools.download --data-dir "$(MELA_DATA_DIR)" download --mirror "$(METALABEL_MIRROR)" $(DOWNLOAD_ARGS)

.PHONY: initialize_workspace download_all $(MELA_DOWNLOADS) unpack_datasets bench_data

initialize_workspace:
	mkdir -p "$(MELA_DATA_DIR)" "$(MELA_WORKSPACE)/checkpoint/label_learn/saves"

download_all: setup
	$(DOWNLOAD) all

$(MELA_DOWNLOADS): setup
	$(DOWNLOAD) $(@:download_%=%)

unpack_datasets: setup
	$(PY) -m tools.download --data-dir "$(MELA_DATA_DIR)" unpack

bench_data: setup
	$(PY) bench/bench_data.py $(BENCH_DATA_ARGS)

# ---- Studies: the papers' experiments over seeds, then the report's table and figure (docs/experiments.md) ------
#   make maxl_hierarchies | maxl_psi  [SEEDS=0,1] [ARGS='hydra/launcher=slurm hydra.launcher.partition=...']
#   make mela_study  [DATASETS='miniImageNet tieredImageNet'] [MODELS='resnet12 resnet18'] [SEEDS=0,1,2] [NAME=...]
# STUDY_DIR: where the runs, table.csv, table.json and the figure go (default: a new folder per invocation for the
# MAXL sweeps, logs/pipeline/<NAME> for mela_study, which continues where the same command stopped).
# The variables reach tools/study.py through the environment, as given (never spliced into the recipe's shell
# text), so ARGS may span lines or hold quotes and the results stay in the study's folder.
MAXL_STUDIES := maxl_hierarchies maxl_psi
export ARGS SEEDS STUDY_DIR NAME DATASET DATASETS MODELS
.PHONY: $(MAXL_STUDIES) mela_study

$(MAXL_STUDIES) mela_study: setup
	$(PY) -m tools.study $@

# ---- MeLa on CIFAR-FS and FC100 (from the CIFAR-100 archive of `make download_cifar100`) ----------------------
#   make mela_cifar  [CIFAR_DATASETS='cifar_fs fc100'] [SEEDS=0,1,2] [NAME=...] [STUDY_DIR=...] [ARGS='...']
# The whole pipeline per dataset (ResNet-12, 32x32, model.dropblock_size=2; the labeler's K from the dataset's
# config), meta_eval 1-shot and 5-shot of every step, then the table (tools/study.py).
export CIFAR_DATASETS
.PHONY: mela_cifar
mela_cifar: setup
	$(PY) -m tools.study $@
