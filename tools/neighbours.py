"""Figure 4 (right) of the paper from any checkpoint: validation images beside the training images
whose last-hidden-layer (fc7) features are nearest.

    python -m tools.neighbours RUN/checkpoint.pt SHARDS OUT.png [--queries 5] [--k 6] [--max-train N]

fc7's 4,096 outputs after ReLU (eval mode: no dropout; centre crop; the
checkpoint's normalization) are computed for the training images in source order
and stored as float16 in RUN/fc7-train.f16 (--features elsewhere): a 4 KiB JSON
header (the checkpoint's digest, the shard set's identity, the count and the
width), then the features. A later call with the same checkpoint, shard set and
count reuses the file; anything else rebuilds it. At ImageNet's size that file is
1.28M x 4096 x 2 bytes, about 10.5 GB (the tool says so before it starts), and
the extraction is one forward pass over the training set; --max-train N uses the
first N training images only.

The search is exact Euclidean distance, in blocks of --block training features
at a time (on the GPU where there is one): the queries against one block,
merged with the best k so far. Memory is the queries times one block, whatever
the number of training images.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys

import numpy as np
import torch
from tqdm import tqdm

from model.errors import UsageError, command
from pipeline.shards import sha256_file
from tools.figures import check_out, open_model, save

HEADER_BYTES = 4096  # the feature file's JSON header, padded; the float16 rows follow
FEATURES_FILE = "fc7-train.f16"


def nearest(queries: torch.Tensor, features, k: int, block: int = 65536,
            device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(squared distances [Q, k], indices [Q, k]) of each query's k nearest rows of `features` (an [N, D]
    array, float16 memory map or any NumPy array), nearest first. Rows are read `block` at a time and
    compared in float32: ||q||^2 - 2 q.t + ||t||^2 over the block, merged with the best k so far."""
    q = queries.to(device, torch.float32)
    q_norm = (q * q).sum(1, keepdim=True)
    k = min(k, len(features))
    best_d = torch.full((len(q), 0), float("inf"), device=device)
    best_i = torch.zeros((len(q), 0), dtype=torch.int64, device=device)
    for start in range(0, len(features), block):
        t = torch.from_numpy(np.asarray(features[start:start + block], dtype=np.float32)).to(device)
        t_norm = torch.linalg.vector_norm(t, dim=1) ** 2  # no block-sized temporary, as t * t would make
        d = (q_norm - 2 * q @ t.T + t_norm[None]).clamp_min_(0)
        idx = torch.arange(start, start + len(t), device=device).expand(len(q), -1)
        merged_d, merged_i = torch.cat([best_d, d], 1), torch.cat([best_i, idx], 1)
        best_d, pos = merged_d.topk(min(k, merged_d.shape[1]), 1, largest=False, sorted=True)
        best_i = merged_i.gather(1, pos)
        del t, d, merged_d, merged_i  # the next block is read with this one gone: one block at a time
    return best_d.cpu(), best_i.cpu()


def read_header(path: str) -> dict | None:
    """The feature file's header, or None if there is no complete file at `path`."""
    try:
        with open(path, "rb") as f:
            header = json.loads(f.read(HEADER_BYTES).decode().strip())
        expected = HEADER_BYTES + 2 * header["count"] * header["dim"]
        return header if os.path.getsize(path) == expected else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def open_features(path: str, header: dict) -> np.memmap:
    return np.memmap(path, dtype=np.float16, mode="r", offset=HEADER_BYTES, shape=(header["count"], header["dim"]))


def fc7(model, images: torch.Tensor, device, dtype=torch.float16) -> torch.Tensor:
    """fc7 features of a batch on the host, in `dtype`: on a GPU under bf16 autocast (as the trainer runs
    the model) and converted there, so half the bytes cross the bus; on the CPU in float32 as before."""
    dev = torch.device(device)
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
        h = model.hidden(images.to(dev))
    return h.to(dtype).cpu()


@torch.no_grad()
def extract(model, loader, count: int, path: str, header: dict, device) -> None:
    """fc7 features of the loader's first `count` images into a new feature file at `path` (written under
    a temporary name, renamed when complete)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(json.dumps(header).encode().ljust(HEADER_BYTES - 1) + b"\n")
        out = np.memmap(tmp, dtype=np.float16, mode="r+", offset=HEADER_BYTES, shape=(count, header["dim"]))
        done = 0
        with tqdm(total=count, desc="fc7 features", unit="img", dynamic_ncols=True, mininterval=1.0,
                  file=sys.stderr) as bar:
            rows_hash = hashlib.sha256()  # over the float16 rows in file order, as they are written
            for images, _ in loader:
                h = fc7(model, images, device).numpy()[:count - done]
                out[done:done + len(h)] = h
                rows_hash.update(h.tobytes())
                done += len(h)
                bar.update(len(h))
                if done >= count:
                    break
        out.flush()
        del out
        header["rows_sha256"] = rows_hash.hexdigest()  # a reuse checks the rows too, not only whose they are
        with open(tmp, "r+b") as f:
            f.write(json.dumps(header).encode().ljust(HEADER_BYTES - 1) + b"\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def train_features(model, ckpt: dict, checkpoint: str, shards: str, loader, count: int, path: str, device) -> dict:
    """The feature file at `path` for this checkpoint, shard set and count: reused if it is there, made
    (with its size said first) otherwise. Returns its header."""
    from model.checkpoint import dataset_id
    dim = model.fc7.out_features if hasattr(model, "fc7") else 2 * model.halves[0].fc7.out_features
    header = {"checkpoint_digest": ckpt["digest"], "dataset": dataset_id(shards), "count": count, "dim": dim,
              "layer": "fc7 after ReLU, eval mode, centre crop", "checkpoint": os.path.abspath(checkpoint)}
    found = read_header(path)
    why = " (rebuilding: made for another checkpoint, shard set or count)" if found else ""
    if found is not None and all(found.get(k) == header[k] for k in ("checkpoint_digest", "dataset", "count", "dim")):
        if found.get("rows_sha256") == sha256_file(path, start=HEADER_BYTES):  # one read, far less than a pass
            print(f"neighbours: reusing {path} ({count} x {dim} float16, this checkpoint and shard set)",
                  file=sys.stderr)
            return found
        why = " (rebuilding: its rows do not match their sha256: damaged)"
    size = HEADER_BYTES + 2 * count * dim
    print(f"neighbours: fc7 features of {count} training images: {count} x {dim} x 2 bytes = {size / 1e9:.2f} GB "
          f"({size / 2**20:.1f} MiB) in {path}{why}", file=sys.stderr)
    extract(model, loader, count, path, header, device)
    return header


def train_sample(shards: str, manifest: dict, index: int) -> tuple[bytes, int]:
    """(stored JPEG, label) of training sample `index` in source order (shard order, then tar order)."""
    from pipeline.shards import read_index, split_shards
    for shard in split_shards(manifest, shards, "train"):
        if index < shard["samples"]:
            entry = read_index(shard["index"])[index]
            with open(shard["path"], "rb") as f:
                members = {}
                for ext in ("jpg", "cls"):
                    offset, size = entry.member(ext)
                    f.seek(offset)
                    members[ext] = f.read(size)
            return members["jpg"], int(members["cls"])
        index -= shard["samples"]
    raise IndexError(index)


def draw(rows: list[tuple[np.ndarray, str, list[tuple[np.ndarray, str]]]], path: str, title: str) -> None:
    """One row per query: the query image, then its neighbours, nearest first."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    columns = 1 + max(len(n) for _, _, n in rows)
    fig, axes = plt.subplots(len(rows), columns, figsize=(1.7 * columns, 1.95 * len(rows)), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for r, (query, caption, neighbours) in enumerate(rows):
        axes[r, 0].imshow(query)
        axes[r, 0].set_title(f"val: {caption}", fontsize=7, color="tab:red")
        for c, (img, text) in enumerate(neighbours, start=1):
            axes[r, c].imshow(img)
            axes[r, c].set_title(text, fontsize=6)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save(fig, path)


@command("neighbours")
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="RUN/checkpoint.pt of model.train")
    p.add_argument("shards", help="shard directory with train and val splits of the checkpoint's classes")
    p.add_argument("out", help="PNG file to write")
    p.add_argument("--queries", type=int, default=5, help="validation images (the first ones)")
    p.add_argument("--k", type=int, default=6, help="neighbours per query (the paper shows six)")
    p.add_argument("--max-train", type=int, default=0, help="use only the first N training images (0: all)")
    p.add_argument("--features", help=f"the feature file (default: {FEATURES_FILE} beside the checkpoint)")
    p.add_argument("--block", type=int, default=65536, help="training features compared at a time")
    p.add_argument("--devices", default="auto", help="cpu, cuda, cuda:N; auto: cuda if any")
    p.add_argument("--backend", default="auto", help="data pipeline: dali, wds or auto")
    a = p.parse_args(argv)
    from model.devices import parse_devices
    from pipeline import make_loader
    from pipeline.shards import ShardError
    try:
        for name in ("queries", "k", "block"):
            if getattr(a, name) < 1:
                raise UsageError(f"--{name} must be >= 1, not {getattr(a, name)}")
        if a.max_train < 0:
            raise UsageError(f"--max-train must be >= 0 (0: all), not {a.max_train}")
        check_out(a.out)
        features_path = a.features or os.path.join(os.path.dirname(os.path.abspath(a.checkpoint)), FEATURES_FILE)
        check_out(features_path, image=False)
        device = parse_devices(a.devices)[0]
        model, ckpt, manifest = open_model(a.checkpoint, a.shards, device)
        on_gpu = device.startswith("cuda")
        if on_gpu:  # as the trainer runs it on one GPU; the loaders below deliver that memory format
            model = model.to(memory_format=torch.channels_last)
        norm = ckpt["normalization"]
        splits = manifest["splits"]
        for split in ("train", "val"):
            if not splits.get(split, {}).get("samples"):
                raise UsageError(f"{a.shards}: has no {split} images")
        try:
            # the rank's share of the cores (not 2 threads): one pass over 1.28M images is this tool's cost
            from model.checkpoint import input_size
            side = input_size(ckpt)  # the checkpoint's crops, never a flag that could disagree
            train_loader = make_loader(a.shards, "train", batch_size=64, device=device, crop="center", shuffle=False,
                                       normalization=norm, backend=a.backend, channels_last=on_gpu, crop_size=side)
            val_loader = make_loader(a.shards, "val", batch_size=min(a.queries, 64), device=device, crop="center",
                                     normalization=norm, backend=a.backend, channels_last=on_gpu, crop_size=side)
        except ShardError as e:
            raise UsageError(str(e)) from None
    except UsageError as e:
        print(f"neighbours: {e}", file=sys.stderr)
        return 2
    count = min(a.max_train or train_loader.num_samples, train_loader.num_samples)
    header = train_features(model, ckpt, a.checkpoint, a.shards, train_loader, count, features_path, device)
    features = open_features(features_path, header)
    with torch.no_grad():  # one pass over the first val batches: their images, features and labels together
        shown, queries, labels = [], [], []
        for images, y in val_loader:
            shown.append(images.cpu())
            queries.append(fc7(model, images, device, torch.float32))
            labels.append(y)
            if sum(len(t) for t in labels) >= a.queries:
                break
        shown = torch.cat(shown)[:a.queries]
        queries, labels = torch.cat(queries)[:a.queries], torch.cat(labels)[:a.queries]
    dist, idx = nearest(queries, features, a.k, a.block, device)
    rows = _figure_rows(a.shards, manifest, val_loader.classes, shown, labels, dist, idx, norm)
    draw(rows, a.out, f"{a.checkpoint} (step {ckpt['step']}): val images (left) and the {a.k} training images "
                      f"with the nearest fc7 features (of {count})")
    print(f"{len(rows)} queries x {idx.shape[1]} neighbours -> {a.out}")
    return 0


def _figure_rows(shards, manifest, names, shown, labels, dist, idx, norm):
    """(query pixels, its class, [(neighbour pixels, caption)]) per query, for draw()."""
    from PIL import Image
    pixels = np.clip(norm.unapply(shown.double().numpy(), lit=False), 0, 255)
    pixels = pixels.round().astype(np.uint8).transpose(0, 2, 3, 1)
    rows = []
    for q in range(len(shown)):
        neighbours = []
        for d, i in zip(dist[q].tolist(), idx[q].tolist()):
            jpeg, label = train_sample(shards, manifest, i)
            neighbours.append((np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB")),
                               f"{names[label]}\nd {d ** 0.5:.1f}"))
        rows.append((pixels[q], names[int(labels[q])], neighbours))
    return rows


if __name__ == "__main__":
    sys.exit(main())
