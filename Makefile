# Two commands on a fresh Debian machine with Python 3.11:
#   make demo   - set up, then render "a red fox running through snow" on the embedded farm
#   make test   - set up, then run the whole test suite against real Valkey, Mooncake, S3 and ffmpeg
#   (make test-fast: unit tests only; make lint: ruff, mypy and the import contracts)
VENV ?= .venv
PROMPT ?= a red fox running through snow

.PHONY: setup demo test test-fast lint bench
setup: $(VENV)/.reelfarm-installed
$(VENV)/.reelfarm-installed: pyproject.toml scripts/setup.sh
	VENV=$(VENV) bash scripts/setup.sh

demo: setup
	$(VENV)/bin/reelfarm run "$(PROMPT)"

# The suite mostly waits (servers, worker processes, hand-offs), so it runs on TEST_WORKERS pytest-xdist
# workers, more than the CI machine's 2 cores; tests/parallel_plan.py says which tests share a worker and why.
TEST_WORKERS ?= 4
test: setup
	$(VENV)/bin/python -m pytest -q -ra -n $(TEST_WORKERS) --dist loadgroup

# Unit tests only: no servers, no worker processes (under a minute).
test-fast: setup
	$(VENV)/bin/python -m pytest -q -ra -m "not integration"

lint: setup
	$(VENV)/bin/ruff check scheduler workers tests bench
	$(VENV)/bin/mypy scheduler workers bench
	$(VENV)/bin/lint-imports

bench: setup
	$(VENV)/bin/python -m bench.handoff
