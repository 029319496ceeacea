"""Benchmarks: `python -m tools.dev.bench {shards,pca,pipeline,train,gpu,all}` (see __main__.py)."""
