"""Tools for developing this project, not for using it: the benchmarks (bench), mutation testing
(mutants), the init study (init_study), the GPU check (gpu_check.sh) and the demo behind `make demo`.
A user's tools (make_shards, verify_shards, compute_pca, show_batch, make_sample_data) are in tools/."""
