# The commands of the README: `make demo`, `make demo-text`, `make test` and `make docs`. They
# create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo demo-text test lint format docs

REQUIREMENTS := $(wildcard requirements*.txt)

# keras-hub and tensorflow-text go in last with --no-deps: tensorflow-text's wheels require the
# full `tensorflow` package, which pip would otherwise install over tensorflow-cpu (see
# docs/models.md, "Installing keras-hub beside tensorflow-cpu").
$(STAMP): $(REQUIREMENTS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements-dev.txt
	$(BIN)/python -m pip install -q --no-deps -r requirements-hub-nodeps.txt
	touch $(STAMP)

venv: $(STAMP)

configuration.py:
	cp configuration_sample.py configuration.py

# The demo: generate the shapes data set, train, embed, evaluate, answer one query.
DEMO := trainings/demo.json
demo: venv configuration.py
	$(BIN)/python -m datasets.demo --out "$$($(BIN)/python -c 'import config; print(config.data_dir())')/datasets/demo_shapes"
	$(BIN)/python train.py -c $(DEMO)
	$(BIN)/python embed.py -c $(DEMO)
	$(BIN)/python evaluation.py -c $(DEMO) -t 100 -r 10
	$(BIN)/python test.py -c $(DEMO) -r 10 --seed 0

# The text demo: the same shapes (with their captions.csv), a small dual encoder trained from
# scratch, its galleries, text-query scores and two text queries.
DEMO_TEXT := trainings/demo_text.json
demo-text: venv configuration.py
	$(BIN)/python -m datasets.demo --out "$$($(BIN)/python -c 'import config; print(config.data_dir())')/datasets/demo_shapes"
	$(BIN)/python train.py -c $(DEMO_TEXT)
	$(BIN)/python embed.py -c $(DEMO_TEXT)
	$(BIN)/python evaluation.py -c $(DEMO_TEXT) --text-queries -r 10
	$(BIN)/python cbir.py -c $(DEMO_TEXT) -r 10 --text "a small red triangle" --text "a large blue circle" --save "$$($(BIN)/python -c 'import config; print(config.data_dir())')/trainings/demo_text/queries/demo.png"

test: venv
	$(BIN)/python -m pytest

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: venv
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# The docs site (docs/, mkdocs.yml) in site/; strict: a broken link or anchor fails the build.
docs: venv
	$(BIN)/python -m mkdocs build --strict --site-dir site
