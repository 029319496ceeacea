"""What a GPU node's driver can run, and whether a DALI build fits it: read before anything is installed.

    python -m tools.dev.bench.driver info                       # {"driver": "550.54.15", "cuda": "12.4"} or null
    python -m tools.dev.bench.driver check WHEEL ... [--installed DIST ...]

DALI is published per CUDA major version, and each build needs a driver that runs it (DALI's install
guide): nvidia-dali-cuda120 runs on R525.60 and later (R580 included), nvidia-dali-cuda130 only on R580 and
later. nvidia-smi's header says which CUDA version the driver runs. NVIDIA_SMI names another nvidia-smi
(the CPU tests fake one)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys


def driver_info(smi: str | None = None) -> dict | None:
    """{"driver": version, "cuda": the CUDA version it runs} from nvidia-smi, or None where there is none."""
    smi = smi or os.environ.get("NVIDIA_SMI", "nvidia-smi")
    try:
        text = subprocess.run([smi], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    driver, cuda = re.search(r"Driver Version:\s*([\d.]+)", text), re.search(r"CUDA Version:\s*([\d.]+)", text)
    return {"driver": driver.group(1), "cuda": cuda.group(1)} if driver and cuda else None


def dali_cuda_major(name: str) -> int | None:
    """12 for nvidia-dali-cuda120 (a distribution or a wheel file name), 13 for ...cuda130; None otherwise."""
    m = re.search(r"nvidia[-_]dali[-_]cuda(\d+)", os.path.basename(name).lower())
    return int(m.group(1)) // 10 if m else None


def refusal(wheels: list[str], installed: list[str], info: dict | None) -> str | None:
    """Why these wheels must not be installed here (one line), or None. `installed`: the DALI distributions
    the target interpreter has."""
    bundled = sorted({(dali_cuda_major(w), os.path.basename(w)) for w in wheels if dali_cuda_major(w)})
    have = sorted({(dali_cuda_major(d), d) for d in installed if dali_cuda_major(d)})
    if info is not None:
        runs = int(info["cuda"].split(".")[0])
        for major, name in bundled + have:
            if major > runs:
                return (f"this node's driver {info['driver']} runs CUDA {info['cuda']}; {name} needs CUDA {major} "
                        f"(driver R580+): bundle the CUDA {runs} build instead (gpu_check.sh --bundle DIR --cuda {runs})")
    for major, name in bundled:
        others = [d for m, d in have if m != major]
        if others:
            return (f"the interpreter has {others[0]} already; installing {name} beside it leaves two DALI builds "
                    f"writing the same nvidia/dali files: pip uninstall {others[0]} first")
    return None


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["info"]:
        print(json.dumps(driver_info()))
        return 0
    if argv[:1] == ["check"]:
        rest = argv[1:]
        split = rest.index("--installed") if "--installed" in rest else len(rest)
        info = driver_info()
        why = refusal(rest[:split], rest[split + 1:], info)
        if why:
            print(f"gpu_check.sh: {why}", file=sys.stderr)
            return 2
        print(f"driver: {info['driver']}, CUDA {info['cuda']}" if info else "driver: no nvidia-smi here (not checked)")
        return 0
    print(__doc__.split("\n\n")[0], file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
