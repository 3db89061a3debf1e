# The two commands of the README, plus helpers. Every target bootstraps first (idempotent:
# seconds when nothing changed), so a fresh machine needs nothing else.
PY := .venv/bin/python
OUT ?= results/compare-$(shell date +%Y%m%d-%H%M%S)

.PHONY: compare test test-unit bootstrap doctor bench clean-results

# Main job: TensorFlow vs PyTorch on the bundled digits, 1 and 2 local ranks, sync allreduce and
# the async parameter server; writes $(OUT)/report.md with figures.
compare:
	scripts/bootstrap.sh
	$(PY) -m harness compare --config configs/compare_digits.toml --np 1,2 --modes sync,async \
		--out-dir $(OUT)
	ln -sfn $(notdir $(OUT)) results/latest

# Tests: unit, per-framework, multi-process (horovodrun, mpirun) and a local SLURM cluster. The
# single-process tiers run in two test processes; the jobs of several ranks one at a time (two
# at once would share 2 cores between 4-6 ranks). Both parts run; either failing fails.
test:
	scripts/bootstrap.sh --with-slurm
	$(PY) -m pytest -n 2 -m "not ($(JOBS))"; a=$$?; \
	$(PY) -m pytest -m "$(JOBS)"; b=$$?; \
	[ $$a -eq 0 ] && [ $$b -eq 0 ]

JOBS := mpi or slurm or slow

# The unit tier: every test that needs no MPI, Horovod, SLURM, GPU, nor a torch/TensorFlow
# process that builds or trains a model (markers in pyproject.toml). Two test processes
# (pytest-xdist): about a minute on 2 cores; it passes on a machine without Horovod or MPI (one check
# of horovodrun's own parser skips).
UNIT := not mpi and not slurm and not gpu and not slow and not framework
test-unit: bootstrap
	$(PY) -m pytest -n 2 -m "$(UNIT)"

bootstrap:
	scripts/bootstrap.sh

doctor: bootstrap
	$(PY) -m harness doctor

bench: bootstrap
	$(PY) -m harness bench all

clean-results:
	rm -rf results
