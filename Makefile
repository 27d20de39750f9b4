# The two newcomer commands: `make demo` and `make test`. Both set up .venv themselves.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check
# A CPU build of torch is all the demo and the tests need; the package itself accepts a range.
TORCH ?= torch==2.13.0

.PHONY: demo test test-browser install install-dev lint bench clean mutants mutants-fresh

$(VENV)/.base: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) $(TORCH)
	$(PIP) -e .
	touch $@

$(VENV)/.dev: $(VENV)/.base
	$(PIP) -e '.[dev]'
	touch $@

install: $(VENV)/.base
install-dev: $(VENV)/.dev

demo: install
	printf 'ROMEO:\n' | $(VENV)/bin/ventoux generate --max-tokens 200 --temperature 0.8 --seed 1 -

# The browser test (tests/test_browser.py) drives Debian's chromium: Playwright cannot download its own
# browsers here. It is installed with apt-get when missing (as root, or through sudo); elsewhere point
# CHROMIUM at any Chromium or Chrome binary.
CHROMIUM ?= /usr/bin/chromium
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

$(CHROMIUM):
	$(SUDO) apt-get update
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium

test: install-dev $(CHROMIUM)
	VENTOUX_CHROMIUM=$(CHROMIUM) $(PY) -m pytest

test-browser: install-dev $(CHROMIUM)
	VENTOUX_CHROMIUM=$(CHROMIUM) $(PY) -m pytest tests/test_browser.py

lint: install-dev
	$(VENV)/bin/ruff check src tests benchmarks

# Mutation testing, not part of `make test` or CI (mutation/README.md): mutmut on the modules where a silent
# bug costs users most, one module at a time, each mutant running only the tests of its module's own test files
# that call the function it changed (MUTATE="names:test_weights.py" narrows the run). Then the score per module
# and the survivors not yet triaged. The first run records which test calls what, from every selected test.
MUTATE ?= sampling:test_sampling.py,test_generate.py,test_engine.py params:test_sampling.py,test_params_mutants.py names:test_weights.py \
	cache:test_model.py,test_generate.py,test_cache_mutants.py generate:test_generate.py,test_generate_mutants.py batch:test_generate.py,test_engine.py,test_generate_mutants.py,test_batch_mutants.py engine:test_engine.py,test_engine_mutants.py \
	tokenizer:test_tokenizer.py,test_tokenizer_mutants.py weights:test_weights.py,test_hardening.py,test_weights_mutants.py,test_lora_files.py qlinear:test_quantize.py,test_qlinear_mutants.py,test_kleidiai.py \
	kleidiai:test_kleidiai.py,test_kleidiai_mutants.py lora:test_lora.py,test_lora_files.py,test_lora_mutants.py \
	lora_files:test_lora_files.py,test_finetune.py,test_lora_files_mutants.py \
	fastattention:test_fastattention.py fastnorm:test_fastnorm.py \
	fusedproducts:test_fusedproducts.py fastblock:test_fastblock.py \
	prefix:test_engine.py,test_generate.py,test_batch_mutants.py,test_engine_mutants.py,test_prefix_mutants.py train.sft_data:test_finetune.py,test_sft_data_mutants.py \
	server.schemas:test_server.py,test_schemas_mutants.py server.generation:test_server.py,test_generation_mutants.py \
	server.logprobs:test_server.py,test_generation_mutants.py,test_logprobs.py train.finetune:test_finetune.py train.loop:test_train.py,test_finetune.py \
	model:test_model.py,test_lora.py,test_generate.py,test_fastnorm.py,test_fastattention.py,test_train.py,test_quantize.py,test_fusedproducts.py,test_fastblock.py,test_model_mutants.py \
	server.state:test_server.py,test_server_mutants.py server.routes:test_server.py,test_server_mutants.py \
	server.middleware:test_server.py,test_server_mutants.py server.errors:test_server.py,test_server_mutants.py \
	server.metrics:test_server.py,test_server_mutants.py quantize:test_quantize.py,test_quantize_mutants.py \
	api:test_generate.py,test_hardening.py,test_api_mutants.py train.data:test_train.py,test_train_data_mutants.py \
	train.pretrain:test_train.py,test_pretrain_mutants.py train.checkpoint:test_train.py,test_finetune.py,test_pretrain_mutants.py \
	train.evaluate:test_train.py,test_pretrain_mutants.py eval.data:test_eval.py,test_train_data_mutants.py,test_eval_mutants.py \
	eval.perplexity:test_eval.py,test_eval_mutants.py,test_pretrain_mutants.py eval.tasks:test_eval.py,test_eval_mutants.py \
	cli:test_cli_mutants.py,test_hardening.py train.tokenizer:test_train.py,test_train_tokenizer_mutants.py
# MUTMUT_CHILDREN=1 on a machine shared with other jobs (and nice: the run yields to them)
MUTMUT_CHILDREN ?= 2
mutants: install-dev
	$(PIP) -e '.[mutation]'
	rm -f mutants/mutmut-stats.json  # who-calls-what, recorded again from every test (mutmut alone keeps it stale)
	OMP_NUM_THREADS=1 nice -n 19 $(VENV)/bin/mutmut run --max-children $(MUTMUT_CHILDREN) "ventoux.names.x_to_hf__mutmut_1"
	for spec in $(MUTATE); do tests=$$(echo $${spec#*:} | sed 's/,/ or /g'); \
	  (bash mutation/watchdog.sh &); \
	  PYTEST_ADDOPTS="-k '$$tests'" OMP_NUM_THREADS=1 nice -n 19 $(VENV)/bin/mutmut run --max-children $(MUTMUT_CHILDREN) "ventoux.$${spec%%:*}.*" \
	  || exit 1; done
	$(PY) mutation/report.py

# The modules mutmut cannot run (config.py, which conftest imports; the commands, whose tests run the CLI in child
# processes; ...): every mutant in a fresh child, through mutation/fresh_module.sh. FRESH="commands/eval" narrows it
FRESH ?=
mutants-fresh: install-dev
	$(PIP) -e '.[mutation]'
	bash mutation/fresh_all.sh $(FRESH)

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache mutants
