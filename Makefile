# The two commands of the README. Each creates or refreshes .venv itself (scripts/bootstrap.sh).
.PHONY: demo test bootstrap lint

bootstrap:
	@scripts/bootstrap.sh

# The main job: a training pipeline on the embedded local backend.
demo: bootstrap
	.venv/bin/fireloop demo

# Lint, format check, types and the whole test suite.
test: bootstrap
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy
	.venv/bin/pytest -n auto --dist loadfile
