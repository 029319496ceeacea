"""The NVIDIA DALI loader: decoding and augmentation on the GPU (on the CPU without one).

One pipeline definition serves both devices: on a CUDA device the JPEGs are
decoded by nvJPEG (`device="mixed"`: Huffman on the CPU, the rest on the GPU, or
the A100/H100 hardware decoder) and every op after it runs on the GPU, so a batch
reaches the trainer as a CUDA tensor without a host copy. Without a GPU the same
graph runs with `device_id=None` on DALI's CPU threads.

The pipeline is built once per loader. Its input is an external source that feeds
the encoded JPEG bytes of each batch in plan.py's order for this rank, sliced from
the memory-mapped shards (no copy until DALI takes them), with their labels and the
batch's random crop, flip and lighting parameters. The feed does not stop at the end
of an epoch: the next epoch's order is known, so it runs on into it and the pipeline
keeps its prefetched batches across the boundary (no cold start each epoch). The
loader takes exactly its epoch's batches from it. Asked for any other position (a
resume, a loop left midway and restarted elsewhere), it builds the pipeline anew there.
Training and centre crops decode only the 224 crop (fn.decoders.image_crop: a region
of interest, 77 % of the pixels); the ten crops decode the whole image, which they
cover. Flip, lighting and normalisation are one fused crop_mirror_normalize:
lighting adds the same RGB offset to every pixel of an image, so it folds into that
image's mean: (x + light - shift) / divisor = (x - (shift - light)) / divisor
(pipeline/normalization.py).
"""
from __future__ import annotations

import collections
import io
import mmap
import weakref

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.pytorch import DALIGenericIterator

from pipeline import plan
from pipeline.loader import BatchRing, LoaderConfig, ShardLoader, cores_per_process, kept
from pipeline.shards import JPEG_SOI, ShardError, error_text, iter_tar_samples, member_at

DATA_OPS = ("fn.decoders.image",)  # errors of these are about the data (read errors are ShardErrors already)


def dali_reason(error: Exception) -> str:
    """The line of a DALI error that says what went wrong (after 'encountered:'), else its first line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if "encountered:" in lines[:-1]:
        return lines[lines.index("encountered:") + 1]
    return lines[0] if lines else repr(error)


def decode(jpg, gpu: bool, hw_decoder_load: float, roi=None, side: int = plan.CROP):
    """Decoded RGB images; with roi=(x, y), only the plan's 224 crop at crop_pos (x, y), as
    fn.crop_mirror_normalize would place it (the same anchor rounding: DALI's crop window): libjpeg-turbo
    on the CPU and nvJPEG on the GPU skip what lies outside it. On the CPU the pixels equal a full decode's,
    cropped (tested)."""
    if gpu:
        # Memory hints for 256 px images, so nvJPEG never reallocates in the first epochs;
        # fancy upsampling decodes chroma as libjpeg-turbo does on the CPU (same pixels as the tests).
        kw = dict(device="mixed", hw_decoder_load=hw_decoder_load, preallocate_width_hint=256,
                  preallocate_height_hint=256, device_memory_padding=16 << 20, host_memory_padding=8 << 20,
                  jpeg_fancy_upsampling=True)
    else:
        kw = dict(device="cpu")
    if roi is None:
        return fn.decoders.image(jpg, output_type=types.RGB, **kw)
    return fn.decoders.image_crop(jpg, output_type=types.RGB, crop=(side, side), crop_pos_x=roi[0],
                                  crop_pos_y=roi[1], **kw)


@pipeline_def
def shard_pipeline(feed, gpu: bool, crop: str, shift, divisor, layout: str, hw_decoder_load: float = 0.65,
                   side: int = plan.CROP):
    """feed() -> one batch: (encoded JPEGs, labels) and, for crop="random", (crop_x, crop_y, mirror,
    mean) per sample. shift, divisor: [3] in 0-255 units."""
    random = crop == "random"
    outputs = fn.external_source(source=feed, num_outputs=6 if random else 2, batch=True)
    jpg, labels = outputs[0], outputs[1]
    cmn = dict(dtype=types.FLOAT, output_layout=layout)
    if random:  # only the crop is decoded (a region of interest): 224^2 of 256^2 pixels, 77 %
        crop_x, crop_y, mirror, mean = outputs[2:]
        out = fn.crop_mirror_normalize(decode(jpg, gpu, hw_decoder_load, (crop_x, crop_y), side), mirror=mirror,
                                       mean=mean, std=divisor, **cmn)
    elif crop == "center":
        out = fn.crop_mirror_normalize(decode(jpg, gpu, hw_decoder_load, (0.5, 0.5), side), mean=shift, std=divisor,
                                       **cmn)
    else:  # the paper's ten crops: corners and centre, then mirrored; together they cover the image
        images = decode(jpg, gpu, hw_decoder_load)
        out = fn.stack(*[fn.crop_mirror_normalize(images, crop=(side, side), crop_pos_x=x, crop_pos_y=y,
                                                  mirror=m, mean=shift, std=divisor, **cmn)
                         for m in (0, 1) for x, y in plan.TEN_CROP_POSITIONS])
    if gpu:
        labels = labels.gpu()
    return out, labels


def _closed(m: mmap.mmap) -> bool:
    """Closes a mapping unless a view of it is still alive (a batch DALI has not copied yet)."""
    try:
        m.close()
    except BufferError:
        return False
    return True


class DaliLoader(ShardLoader):
    def __init__(self, cfg: LoaderConfig):
        self._orders: dict[int, np.ndarray] = {}  # epoch -> this rank's order (the last two epochs; before
        super().__init__(cfg)                     # the base's init, which asks for epoch 0's to verify)
        self.gpu = self.device.type == "cuda"
        if self.gpu and not torch.cuda.is_available():
            raise RuntimeError(f"device {cfg.device!r} asked for, but torch sees no CUDA GPU")
        self.device_id = (self.device.index or 0) if self.gpu else None
        self.threads = cfg.num_threads or min(cores_per_process(), 8 if self.gpu else 64)
        # Batches with lighting also take the recipe's training scale (normalization.py).
        self.shift, self.divisor = self.norm.shift_divisor(lit=cfg.lighting)
        # shard -> its bytes, mapped on first use, and its _shard_columns; the last KEPT_SHARDS of each kept.
        # Every shard mapped for the loader's life held a file descriptor each (1,252 shards passed the usual
        # limit of 1,024 open files within an epoch) and every page read counted in the process's RSS.
        self._maps: collections.OrderedDict[int, mmap.mmap] = collections.OrderedDict()
        self._unmapped: list[mmap.mmap] = []      # let go while DALI still held a view of them: closed later
        self._columns: collections.OrderedDict[int, tuple] = collections.OrderedDict()
        self._it = None                           # the pipeline's iterator
        self._next_feed = (0, 0)                  # (epoch, batch) the feed serves next
        self._next_out = None                     # (epoch, batch) the iterator yields next
        # DALI's zero-copy batches are held until the GPU has read them (BatchRing says why).
        self._ring = BatchRing(lambda: torch.cuda.Event(), limit=8) if self.gpu else None

    def _shard_bytes(self, shard: int) -> mmap.mmap:
        fresh = shard not in self._maps
        data = kept(self._maps, shard, lambda: self._map(shard), self._unmapped.append)
        if fresh:  # a mapping may have been let go: close every one DALI no longer views
            self._unmapped = [m for m in self._unmapped if not _closed(m)]
        return data

    def _map(self, shard: int) -> mmap.mmap:
        path = self.shards[shard]["path"]
        try:
            with open(path, "rb") as f:
                return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as e:
            raise ShardError(f"{path}: cannot read ({e})") from None

    def _shard_columns(self, shard: int) -> tuple[list, list, list]:
        """(.jpg offsets, .jpg sizes, labels) of a shard's samples, read from its (verified) bytes once,
        so that the feed does a list lookup per sample. Each .jpg must open with the JPEG start marker:
        nvJPEG has crashed the process on bytes that do not."""
        return kept(self._columns, shard, lambda: self._read_columns(shard))

    def _read_columns(self, shard: int) -> tuple[list, list, list]:
        data, path = self._shard_bytes(shard), self.shards[shard]["path"]
        offsets, sizes, classes = [], [], []
        for entry in self.shard_entries(shard):
            (off, size), (coff, csize) = entry.member("jpg"), entry.member("cls")
            for ext, o, n in (("jpg", off, size), ("cls", coff, csize)):  # the .idx (no checksum) agrees
                if member_at(data, o) != (f"{entry.key}.{ext}", n):      # with the verified tar
                    raise ShardError(f"{path}: its .idx does not match the shard at sample {entry.key}.{ext} "
                                     f"(the tar has {member_at(data, o)[0] or 'no member'!r} there); "
                                     "run tools/verify_shards.py")
            if data[off:off + 3] != JPEG_SOI:
                raise ShardError(f"{path}: sample {entry.key}: .jpg is not a JPEG "
                                 f"(starts {bytes(data[off:off + 3]).hex()}, not ffd8ff)")
            try:
                classes.append(int(data[coff:coff + csize]))
            except ValueError:
                raise ShardError(f"{path}: sample {entry.key}: .cls is not a class index "
                                 f"({bytes(data[coff:coff + csize])[:20]!r})") from None
            offsets.append(off)
            sizes.append(size)
        return offsets, sizes, classes

    def _order(self, epoch: int) -> np.ndarray:
        """The plan's order, kept for this epoch and the last: the epoch's iteration and the feed
        (which runs ahead into the next epoch) share it instead of computing it twice."""
        if epoch not in self._orders:
            self._orders = {e: o for e, o in self._orders.items() if e == epoch - 1}
            self._orders[epoch] = super()._order(epoch)
        return self._orders[epoch]

    def _feed(self):
        """The batch at self._next_feed in the plan's order; then on to the next, into the next epoch."""
        epoch, k = self._next_feed
        bs = self.cfg.batch_size
        pairs = self._order(epoch)[k * bs:(k + 1) * bs]
        self._next_feed = (epoch, k + 1) if k + 1 < len(self) else (epoch + 1, 0)
        self.verified(pairs)  # DALI never sees a byte of a shard that does not match its sha256
        jpgs, labels = [], np.empty(len(pairs), np.int64)
        for j, (s, i) in enumerate(pairs.tolist()):
            data, (offsets, sizes, classes) = self._shard_bytes(s), self._shard_columns(s)
            jpgs.append(np.frombuffer(data, np.uint8, sizes[i], offsets[i]))  # a view; DALI copies it
            labels[j] = classes[i]
        if self.cfg.crop != "random":
            return jpgs, labels
        n = len(pairs)
        p = self.params(epoch, k)
        means = (self.shift - self.lighting_offsets(p)[:n]).astype(np.float32)  # lighting folded in
        flips = p.flip[:n] if self.cfg.flip else np.zeros(n, np.int32)
        # Whole arrays, the batch along the first axis: DALI slices them in C++. A list of NumPy
        # scalars costs a Python tensor per sample (~3.6 ms a batch of 128 against ~0.05 ms).
        return (jpgs, labels, np.ascontiguousarray(p.crop_x[:n], np.float32),
                np.ascontiguousarray(p.crop_y[:n], np.float32), np.ascontiguousarray(flips, np.int32), means)

    def _build(self, epoch: int, start: int):
        c = self.cfg
        self._layout = "HWC" if (c.channels_last and c.crop != "ten") else "CHW"
        if self._ring is not None:
            self._ring.clear()  # no batch of the old pipeline outlives it unfinished
        self._it = None  # the old pipeline (if any) goes before the new one takes threads and memory
        self._next_feed = self._next_out = (epoch, start)  # the iterator prefetches as it is made
        loader = weakref.ref(self)  # no cycle loader -> pipeline -> feed -> loader: dropping the loader frees
        #                             the pipeline at once (a pipeline left to the garbage collector can be
        #                             destroyed inside a forked DataLoader worker, which crashes it)
        pipe = shard_pipeline(lambda: loader()._feed(), self.gpu, c.crop, self.shift.tolist(), self.divisor.tolist(),
                              self._layout, c.hw_decoder_load, side=c.crop_size, batch_size=c.batch_size,
                              num_threads=self.threads,
                              device_id=self.device_id, seed=c.seed, prefetch_queue_depth=2)
        pipe.build()
        self._it = DALIGenericIterator([pipe], ["images", "labels"])

    def _epoch_batches(self, epoch: int, start: int, order: np.ndarray):
        if len(order) == 0:
            return
        try:
            if self._it is None or self._next_out != (epoch, start):
                self._build(epoch, start)
            for k in range(start, len(self)):
                out = next(self._it)
                self._next_out = (epoch, k + 1) if k + 1 < len(self) else (epoch + 1, 0)
                images, labels = out[0]["images"], out[0]["labels"].view(-1)
                if self._layout == "HWC":
                    images = self.channels(images)
                try:
                    yield images, labels
                finally:  # the consumer's work on this batch is queued (it asked for the next, or left)
                    if self._ring is not None:
                        self._ring.release_after_use((out, images, labels))
        except RuntimeError as e:
            self._it = None  # a failed pipeline is not reused
            if not any(op in str(e) for op in DATA_OPS):
                raise  # not the data (CUDA out of memory, say): no rescan, no blame on the shards
            raise ShardError(self._diagnose(order, e)) from None

    def _diagnose(self, order: np.ndarray, error: Exception) -> str:
        """DALI's errors name neither shard nor key: find the first bad sample of this epoch's
        shards in Python (a read of each shard it touches; only after a reader or decoder error)."""
        from PIL import Image
        first = dali_reason(error)
        for shard in sorted(set(order[:, 0].tolist())):
            path = self.shards[shard]["path"]
            try:
                for key, sample in iter_tar_samples(path):
                    try:
                        Image.open(io.BytesIO(sample["jpg"])).load()
                        int(sample["cls"])
                    except Exception as e:  # noqa: BLE001
                        return f"{path}: sample {key} is corrupt ({error_text(e)}); DALI said: {first}"
            except ShardError as e:
                return f"{e}; DALI said: {first}"
        return f"{self.cfg.shards_dir}: DALI failed reading split {self.cfg.split}: {first}"
