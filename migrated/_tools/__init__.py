"""Tooling around the daemons, not part of them: benchmarks (``migrated
bench``), the demo (``make demo``), the load generators and the helpers that
run the daemons as local child processes. Nothing in the daemons imports it;
the CLI reaches ``bench`` through a lazy import."""
