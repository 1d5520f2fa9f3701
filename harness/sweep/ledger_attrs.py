"""The names under which the sweep's ledger (harness.sweep.ledger) records its attempts and the sweep, and
who this host is to it. Apart so that the ledger and the modules it is made of (cell_status, reaper) can
share them without importing one another; harness.sweep.ledger still exports every name here.
"""
from __future__ import annotations

import os
import socket

CELL = "harness.cell"            # config hash; present on every trial the sweep enqueued
AXES = "harness.axes"            # axis values of the cell (seed included)
CONFIG = "harness.config"        # the job config, minus output_dir and experiment
ATTEMPT = "harness.attempt"      # 1-based attempt number of this trial at its cell
COST = "harness.cost"            # relative run time (spec.Cell.cost), for the queue's order and the ETA
OWNER = "harness.owner"          # {worker, host, pid, pid_start, log, started}, by the claiming worker
JOB = "harness.job"              # {pid, pid_start} of the job process (its own process group), once started
HEARTBEAT = "harness.heartbeat"  # epoch seconds, refreshed by the running worker
# {state, exit_code, duration_s, run_id, val_reward, error, retry}, from the worker
OUTCOME = "harness.outcome"
REAPED = "harness.reaped"        # why a reaper declared the attempt dead
TUNE = "harness.tune"            # a tuning trial's job: {study, trial, job, jobs, pruner} (harness.sweep.tuning)

# Study attrs, set by the driver, read by every worker.
MAX_ATTEMPTS = "harness.max_attempts"
RETRY_FROM = "harness.retry_from"      # failures of trials numbered below this do not count (--retry-failed)
STALE_AFTER = "harness.stale_after"
PARENT_RUN = "harness.parent_run_id"
DRIVER = "harness.driver"              # {host, pid, pid_start, run_id, heartbeat} of the live driver
GPUS_PER_JOB = "harness.gpus_per_job"  # the scale's gpus_per_job: how every worker launches a job
DEEPSPEED = "harness.deepspeed"        # the scale's deepspeed setting (none, zero2)
CELL_TIMEOUT = "harness.cell_timeout_s"    # wall-clock limit of one attempt (harness.sweep.watchdog)
STALL_TIMEOUT = "harness.stall_timeout_s"  # longest time a job may go without storing a metric
FEEDING = "harness.feeding"  # true while the driver will queue more (tuning): idle workers wait, not leave
# {name, device, reference_s} of the sweep's scale (spec.Plan.ledger_scale), written by the driver
SCALE = "harness.scale"
# A new ledger's id (uuid4): its jobs' runs carry it (contract.LEDGER), so no other ledger adopts them
LEDGER_ID = "harness.ledger_id"

# Attempts owned by this host are judged by their PID, others by heartbeat: machines must have distinct names.
# HARNESS_HOST overrides the host name where they do not (containers started from one image, say).
HOST = os.environ.get("HARNESS_HOST") or socket.gethostname()
# interrupted (Ctrl-C, scheduler preemption, tracking outage) and duplicate do not count
COUNTED_FAILURES = ("failed", "died", "timeout")
