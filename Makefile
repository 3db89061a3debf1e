# The two commands of the README, plus helpers. Every target bootstraps first (idempotent:
# seconds when nothing changed), so a fresh machine needs nothing else.
PY := .venv/bin/python
OUT ?= results/compare-$(shell date +%Y%m%d-%H%M%S)

.PHONY: compare test bootstrap doctor bench clean-results

# Main job: TensorFlow vs PyTorch on the bundled digits, 1 and 2 local ranks, sync allreduce and
# the async parameter server; writes $(OUT)/report.md with figures.
compare:
	scripts/bootstrap.sh
	$(PY) -m harness compare --config configs/compare_digits.toml --np 1,2 --modes sync,async \
		--out-dir $(OUT)
	ln -sfn $(notdir $(OUT)) results/latest

# Tests: unit, per-framework, multi-process (horovodrun, mpirun) and a local SLURM cluster.
test:
	scripts/bootstrap.sh --with-slurm
	$(PY) -m pytest

bootstrap:
	scripts/bootstrap.sh

doctor: bootstrap
	$(PY) -m harness doctor

bench: bootstrap
	$(PY) -m harness bench all

clean-results:
	rm -rf results
