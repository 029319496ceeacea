"""Benchmarks: `python -m tools.bench {shards,pca,pipeline,train,gpu,all}` (see __main__.py)."""
