# The two commands of the README. Both create or reuse .venv and install what is missing.
PY := .venv/bin/python
# torch's OpenMP threads busy-wait by default; on a small shared machine that slowed CPU decoding
# 20-50x (12 s instead of 0.3 s for a 32x64-token batch). Must be set before torch is imported.
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: setup demo test bench clean

setup:
	@bash scripts/bootstrap.sh

# The main job on the embedded default: the shipped tiny policy, held-out eval -> RFT -> DAPO -> eval.
# An earlier run in runs/demo is resumed (asked first on a terminal); DEMO_ARGS=--fresh starts over.
demo: setup
	@$(PY) -m learner.run learner/configs/demo.toml --ask $(DEMO_ARGS)

# The whole test suite. pytest exits 5 when it collected no test: that is a failure here.
test: setup
	@$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; \
	exit $$rc

bench: setup
	@for b in bench/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf .venv .pytest_cache .hypothesis
