"""model.train against a bare PyTorch training loop: the trainer's overhead."""
from __future__ import annotations

import os
import tempfile

from tools.dev.bench.common import _line, _model_rate, _quiet, _shards, _trainer_rate


def bench_train(a) -> dict:
    import shutil
    from tools import compute_pca
    batch, steps = a.batch or 32, a.steps or 6
    print(f"trainer: AlexNet, batch {batch}, {steps} steps per contender, CPU ({os.cpu_count()} cores), "
          "best of 2 (interleaved)")
    with tempfile.TemporaryDirectory() as tmp:
        out = _shards(tmp, batch * (steps + 1))
        _quiet(compute_pca.main, [out, "--quiet"])
        best = {"bare": 0.0, "synthetic": 0.0, "dali": 0.0}
        for _ in range(2):
            best["bare"] = max(best["bare"], _model_rate("cpu", batch, steps, compiled=False, warmup=1))
            for backend in ("synthetic", "dali"):
                run = os.path.join(tmp, f"run-{backend}")
                shutil.rmtree(run, ignore_errors=True)
                best[backend] = max(best[backend], _trainer_rate(out, run, backend, batch))
    _line("bare PyTorch loop, synthetic batch (baseline)", best["bare"])
    _line("model.train, synthetic batches", best["synthetic"])
    _line("model.train, DALI pipeline on the shards", best["dali"])
    print(f"  trainer overhead vs bare loop:            {100 * (1 - best['synthetic'] / best['bare']):+.1f}%  "
          "(goal <= 5%)")
    print(f"  real pipeline / synthetic batches:        {best['dali'] / best['synthetic']:.2f}x  "
          "(on a CPU the pipeline and the model share the cores)")
    return best
