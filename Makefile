# The two commands of the README, and the developer's others.
.PHONY: setup run textlm test test-all lint bench

setup:
	@bash scripts/setup.sh dev

# The main job: the bundled digits pipeline, end to end.
run:
	@bash scripts/setup.sh
	.venv/bin/python -m pipelines.digits.run

# The LM pipeline: byte-level teacher and student on the stdlib sources, four ways (~12 min).
textlm:
	@bash scripts/setup.sh
	.venv/bin/python -m pipelines.textlm.run

# The default test run (what CI runs): everything but the tests marked slow or gpu.
test:
	@bash scripts/setup.sh dev
	.venv/bin/python -m pytest -q -m "not slow and not gpu"

test-all:
	@bash scripts/setup.sh dev
	.venv/bin/python -m pytest -q

lint:
	.venv/bin/ruff check softcache pipelines tests benchmarks
	.venv/bin/ruff format --check softcache pipelines tests benchmarks
	.venv/bin/mypy softcache

bench:
	.venv/bin/python -m benchmarks.run
