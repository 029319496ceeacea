"""make_shards on the Fall 2011 release's tar of tars (fall11_whole.tar, read in place) against the same
images as per-synset folders: reading a tar in place must not cost more than reading files (goal >= 0.9x);
and listing that tar from its headers against from the listing cache make_shards keeps in OUT."""
from __future__ import annotations

import os
import shutil
import tempfile

from tools.dev.bench.common import ROUNDS, _interleaved, _line, _quiet


def bench_layouts(a) -> dict:
    from tools import make_sample_data, make_shards
    images = a.images or 1600
    classes = 16
    print(f"make_shards --workers 1 on {images} generated images of about 500x375 px in {classes} synsets, "
          f"as fall11_whole.tar and as <wnid>/ folders (--val-fraction 0.5; best of {ROUNDS} rounds)")
    with tempfile.TemporaryDirectory() as tmp:
        roots = {}
        for layout in ("fall11-tar", "fall11-folders"):  # the same seed: the same images in both
            roots[layout] = os.path.join(tmp, layout)
            make_sample_data.generate(roots[layout], layout, classes=classes, train_per_class=images // classes,
                                      val_per_class=1, seed=0, quirks=False)
        made = []

        def run(layout):
            def go():
                made.append(os.path.join(tmp, f"out-{len(made)}"))
                assert _quiet(make_shards.main, [roots[layout], made[-1], "--val-fraction", "0.5", "--workers", "1",
                                                 "--shard-samples", str(max(1, images // 16))]) == 0
                shutil.rmtree(made[-1])
            return go

        for layout in roots:  # warm the page cache for both
            run(layout)()
        res = _interleaved(images, {"tar": run("fall11-tar"), "folders": run("fall11-folders")}, rounds=ROUNDS)
        listing = _listing_rates(roots["fall11-tar"], os.path.join(tmp, "cache"), images)
    _line("fall11_whole.tar, read in place", res["tar"])
    _line("<wnid>/ folders", res["folders"])
    print(f"  ratio tar of tars / folders: {res['ratio:tar/folders']:.2f}x  (goal >= 0.9; range "
          f"{res['range:tar/folders']}; CPU seconds {res['cpu_ratio:tar/folders']:.2f}x)")
    _line("listing fall11_whole.tar from its headers", listing["headers"])
    _line("listing it from make_shards' cache in OUT", listing["cache"])
    print(f"  ratio cache / headers: {listing['ratio:cache/headers']:.2f}x  (range {listing['range:cache/headers']}; "
          "page cache warm: a cold file system adds a seek a header)")
    return {**res, **{f"listing_{k}": v for k, v in listing.items()}}


def _listing_rates(root: str, cache_dir: str, images: int) -> dict:
    """open_source on a fall11_whole.tar: images/s from its tar headers, and from the listing cache that
    make_shards keeps in OUT (written by a first listing), in paired rounds."""
    from tools.imagenet_source import open_source

    def listing(cache: str | None):
        def go():
            src = open_source(root, layout="fall11", val_fraction=0.5, seed=0, cache_dir=cache)
            assert bool(src.cached) == bool(cache)
        return go

    open_source(root, layout="fall11", val_fraction=0.5, seed=0, cache_dir=cache_dir)  # writes the cache
    return _interleaved(images, {"headers": listing(None), "cache": listing(cache_dir)}, rounds=ROUNDS)
