"""modelhost's benchmark suite: `python -m bench` (see docs/benchmarks.md). Never part of the
test suite; everything it starts listens on 127.0.0.1 and is stopped when it ends."""
