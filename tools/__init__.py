"""A user's tools: make_shards (ImageNet -> shards), verify_shards, compute_pca (pca.json), show_batch
(one batch as the model sees it), make_sample_data (a synthetic ImageNet). Development tools
(benchmarks, mutation testing, the init study, the GPU check, the demo) are in tools/dev/."""
