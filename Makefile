PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint bench paper clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/python pipelines/full.py --config configs/quick.yaml

test: $(STAMP)
	$(BIN)/ruff check xai_core pipelines tests bench
	RAY_DATA_DISABLE_PROGRESS_BARS=1 $(BIN)/python -m pytest -q -n 2 --dist loadfile

lint: $(STAMP)
	$(BIN)/ruff check xai_core pipelines tests bench

bench: $(STAMP)
	$(BIN)/pip install -q -e '.[test,bench]'
	RAY_DATA_DISABLE_PROGRESS_BARS=1 $(BIN)/python -m pytest -q -m bench tests/unit/test_bench.py
	$(BIN)/python -m bench.attribution
	$(BIN)/python -m bench.metrics
	$(BIN)/python -m bench.stages
	$(BIN)/python -m bench.reads
	$(BIN)/python -m bench.ingest
	$(BIN)/python -m bench.evaluate
	$(BIN)/python -m bench.training
	$(BIN)/python -m bench.passes
	$(BIN)/python -m bench.pass_size

# The check against the committed docs/RESULTS.md is printed (and kept in runs/paper/report/reproduction.json)
# before the new run's table replaces it; a difference beyond the seeds' spread does not stop the copy.
# artifacts/paper (committed to git) keeps every model, precompute round and evaluate shard the run has committed, so that a run cut
# short (a session's end, a lost machine) resumes on a fresh checkout: restored first, saved after, also on failure
# (`python -m pipelines.keep save` while it runs keeps what is committed so far).
paper: $(STAMP)
	$(BIN)/python -m pipelines.keep restore --config configs/paper.yaml
	$(BIN)/python pipelines/full.py --config configs/paper.yaml; rc=$$?; \
		$(BIN)/python -m pipelines.keep save --config configs/paper.yaml && exit $$rc
	-$(BIN)/python -m pipelines.results docs/RESULTS.md runs/paper/report/RESULTS.md \
		--json runs/paper/report/reproduction.json
	cp runs/paper/report/RESULTS.md docs/RESULTS.md

clean:
	rm -rf $(VENV)
