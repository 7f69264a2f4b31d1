# The two commands of the README: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo test lint format

$(STAMP): $(wildcard requirements*.txt)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements-dev.txt
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

test: venv
	$(BIN)/python -m pytest

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: venv
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .
