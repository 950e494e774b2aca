"""Reference implementations that benchmarks measure ours against (never imported by the engine)."""
