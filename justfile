# TrafficBuster recipes. On a fresh machine use ./dev <recipe>: it installs what they need.
set shell := ["bash", "-euo", "pipefail", "-c"]

venv := ".venv"
bin := venv / "bin"

# list the recipes
default:
    @just --list

# make the checkout runnable (venv, package with dev extras, Chromium)
setup:
    bash scripts/bootstrap.sh

# the whole system on embedded defaults, with the demo job (Ctrl-C stops it)
up *ARGS: setup
    {{bin}}/tb up {{ARGS}}

# Test processes working at once. The tests mostly wait (on nats-server, Chromium,
# sockets and timers), so more workers than cores pays; each test file stays on one
# worker, so a file's shared browser starts once. TB_TEST_WORKERS=0 runs them in one.
test_workers := env_var_or_default("TB_TEST_WORKERS", "4")
parallel := "-n " + test_workers + " --dist loadfile"

# the default test suite (real nats-server, real Chromium), without the slow tests
test *ARGS: setup
    {{bin}}/python -m pytest -q -m "not slow" {{parallel}} {{ARGS}}

# every test, the slow ones too (process kills, long browser runs): what CI runs
test-all *ARGS: setup
    {{bin}}/python -m pytest -q {{parallel}} {{ARGS}}

# ruff, formatting and mypy --strict
lint: setup
    {{bin}}/ruff check .
    {{bin}}/ruff format --check .
    {{bin}}/mypy

# end-to-end no-op flow throughput against raw JetStream publish, in one run
bench-engine *ARGS: setup
    {{bin}}/python -m benchmarks.engine {{ARGS}}

# dispatcher restart from its snapshot against a full read of the log, in one run
bench-restart *ARGS: setup
    {{bin}}/python -m benchmarks.restart {{ARGS}}

# dispatcher tick time and snapshot size: 100,000 finished jobs in history against 100
bench-state *ARGS: setup
    {{bin}}/python -m benchmarks.state {{ARGS}}

# read-model rebuild rate against an ordered consumer reading the same stream, and API memory while replaying
bench-replay *ARGS: setup
    {{bin}}/python -m benchmarks.replay {{ARGS}}

# browser density: concurrent 1-second flows per GiB and flows/minute, our runner against a browser per flow
bench-runner *ARGS: setup
    {{bin}}/python -m benchmarks.runner {{ARGS}}

# a 1M-row targets csv through tb api's chunked upload against the csv module, and the API's peak RSS
bench-import *ARGS: setup
    {{bin}}/python -m benchmarks.import_ {{ARGS}}

# the API under load: GET /api/v1/jobs p50/p99 with 10,000 jobs and 100 clients, /ws fan-out to 500
bench-api *ARGS: setup
    {{bin}}/python -m benchmarks.api {{ARGS}}

# 2,000 short flows on one runner: RSS and open files at the end against after the first 200
soak *ARGS: setup
    {{bin}}/python -m benchmarks.soak {{ARGS}}
