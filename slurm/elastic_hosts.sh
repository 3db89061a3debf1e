#!/bin/bash
# Host discovery script of elastic.sbatch: horovodrun runs it every second and starts or drops
# ranks as its answer changes. It prints host:slots for each node of this job that SLURM
# reports able to run (not down, drained, failing or unresponsive), by NodeAddr.
exec "${HARNESS_PYTHON:-python}" -m launchers.elastic
