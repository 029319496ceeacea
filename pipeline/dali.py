"""The NVIDIA DALI loader: decoding and augmentation on the GPU (on the CPU without one).

One pipeline definition serves both devices: on a CUDA device the JPEGs are
decoded by nvJPEG (`device="mixed"`: Huffman on the CPU, the rest on the GPU, or
the A100/H100 hardware decoder) and every op after it runs on the GPU, so a batch
reaches the trainer as a CUDA tensor without a host copy. Without a GPU the same
graph runs with `device_id=None` on DALI's CPU threads.

Reading is DALI's webdataset reader over the shards' tars, driven by index files
written per epoch (plan.py's order for this rank: the reader reads the samples of
a shard in exactly the order of its index file). The `.cls` ASCII labels are
parsed inside the graph. The random crop, flip, lighting and normalisation are one
fused crop_mirror_normalize: lighting adds the same RGB offset to every pixel of an
image, so it folds into that image's mean: (x + light - shift) / divisor
= (x - (shift - light)) / divisor (pipeline/normalization.py).
"""
from __future__ import annotations

import io
import os
import shutil
import tempfile

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali import math as dmath
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from pipeline import plan
from pipeline.loader import LoaderConfig, ShardLoader
from pipeline.shards import ShardError, index_text, iter_tar_samples

CLS_DIGITS = 4  # .cls holds up to 4 ASCII digits (class indices below 10,000)
DATA_OPS = ("fn.decoders.image", "fn.readers.webdataset")  # errors of these are about the data


def dali_reason(error: Exception) -> str:
    """The line of a DALI error that says what went wrong (after 'encountered:'), else its first line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if "encountered:" in lines[:-1]:
        return lines[lines.index("encountered:") + 1]
    return lines[0] if lines else repr(error)


def parse_ascii_int(cls):
    """uint8 ASCII digits ('207') -> int64 207, inside the DALI graph (no Python per sample).

    Pad to 4 digits with '0' at the end ('2070'), take the place values, then divide
    by 10^(number of padding digits)."""
    n = cls.shape(dtype=types.INT32)
    digits = fn.cast(fn.pad(cls, fill_value=ord("0"), shape=[CLS_DIGITS]), dtype=types.INT32) - ord("0")
    places = types.Constant(np.array([10 ** (CLS_DIGITS - 1 - i) for i in range(CLS_DIGITS)], np.int32))
    value = fn.reductions.sum(digits * places, axes=[0])
    scale = dmath.pow(types.Constant(10, dtype=types.INT32), CLS_DIGITS - fn.reshape(n, shape=[]))
    return fn.cast(value // scale, dtype=types.INT64)


@pipeline_def
def shard_pipeline(paths, index_paths, params_source, gpu: bool, crop: str, shift, divisor, layout: str):
    """paths/index_paths: one (tar, index file) per run. params_source(batch_info) -> per-sample
    (crop_x, crop_y, mirror, mean) for crop="random". shift, divisor: [3] in 0-255 units."""
    jpg, cls = fn.readers.webdataset(
        paths=paths, index_paths=index_paths, ext=["jpg", "cls"], missing_component_behavior="error",
        random_shuffle=False, pad_last_batch=True, name="reader")
    if gpu:
        # Memory hints for 256 px images, so nvJPEG never reallocates in the first epochs;
        # fancy upsampling decodes chroma as libjpeg-turbo does on the CPU (same pixels as the tests).
        images = fn.decoders.image(jpg, device="mixed", output_type=types.RGB, hw_decoder_load=0.65,
                                   preallocate_width_hint=256, preallocate_height_hint=256,
                                   device_memory_padding=16 << 20, host_memory_padding=8 << 20,
                                   jpeg_fancy_upsampling=True)
    else:
        images = fn.decoders.image(jpg, device="cpu", output_type=types.RGB)
    labels = parse_ascii_int(cls)
    cmn = dict(crop=(plan.CROP, plan.CROP), dtype=types.FLOAT, output_layout=layout)
    if crop == "random":
        crop_x, crop_y, mirror, mean = fn.external_source(source=params_source, num_outputs=4, batch=True,
                                                          batch_info=True)
        out = fn.crop_mirror_normalize(images, crop_pos_x=crop_x, crop_pos_y=crop_y, mirror=mirror,
                                       mean=mean, std=divisor, **cmn)
    elif crop == "center":
        out = fn.crop_mirror_normalize(images, crop_pos_x=0.5, crop_pos_y=0.5, mean=shift, std=divisor, **cmn)
    else:  # the paper's ten crops: corners and centre, then mirrored
        out = fn.stack(*[fn.crop_mirror_normalize(images, crop_pos_x=x, crop_pos_y=y, mirror=m,
                                                  mean=shift, std=divisor, **cmn)
                         for m in (0, 1) for x, y in plan.TEN_CROP_POSITIONS])
    if gpu:
        labels = labels.gpu()
    return out, labels


class DaliLoader(ShardLoader):
    def __init__(self, cfg: LoaderConfig):
        super().__init__(cfg)
        self.gpu = self.device.type == "cuda"
        if self.gpu and not torch.cuda.is_available():
            raise RuntimeError(f"device {cfg.device!r} asked for, but torch sees no CUDA GPU")
        self.device_id = (self.device.index or 0) if self.gpu else None
        self.threads = cfg.num_threads or min(os.cpu_count() or 1, 8 if self.gpu else 64)
        self._tmp = tempfile.mkdtemp(prefix="dali-idx-")
        # Batches with lighting also take the recipe's training scale (normalization.py).
        self.shift, self.divisor = self.norm.shift_divisor(lit=cfg.lighting)

    def __del__(self):
        shutil.rmtree(getattr(self, "_tmp", ""), ignore_errors=True)

    def _write_indices(self, epoch: int, order: np.ndarray) -> tuple[list[str], list[str]]:
        """One index file per run of the order: DALI reads each tar's samples in that order."""
        for f in os.listdir(self._tmp):
            os.remove(os.path.join(self._tmp, f))
        paths, index_paths = [], []
        for j, run in enumerate(plan.runs(order)):
            path = os.path.join(self._tmp, f"e{epoch}-{j:06d}.idx")
            entries = self.entries[run.shard]
            with open(path, "w") as f:
                f.write(index_text([entries[i] for i in run.samples]))
            paths.append(self.shards[run.shard]["path"])
            index_paths.append(path)
        return paths, index_paths

    def _params_source(self, epoch: int, start: int):
        def source(info):
            p = self.params(epoch, start + info.iteration)
            means = (self.shift - self.lighting_offsets(p)).astype(np.float32)  # lighting folded in
            flips = p.flip if self.cfg.flip else np.zeros_like(p.flip)
            return list(p.crop_x), list(p.crop_y), list(flips), list(means)
        return source

    def _epoch_batches(self, epoch: int, start: int, order: np.ndarray):
        if len(order) == 0:
            return
        c = self.cfg
        paths, index_paths = self._write_indices(epoch, order)
        layout = "HWC" if (c.channels_last and c.crop != "ten") else "CHW"
        pipe = shard_pipeline(paths, index_paths, self._params_source(epoch, start), self.gpu, c.crop,
                              self.shift.tolist(), self.divisor.tolist(), layout, batch_size=c.batch_size,
                              num_threads=self.threads, device_id=self.device_id,
                              seed=c.seed, prefetch_queue_depth=2)
        try:
            pipe.build()
            it = DALIGenericIterator([pipe], ["images", "labels"], reader_name="reader",
                                     last_batch_policy=LastBatchPolicy.PARTIAL, auto_reset=False)
            for out in it:
                images, labels = out[0]["images"], out[0]["labels"].view(-1)
                if layout == "HWC":
                    images = self.channels(images)
                yield images, labels
        except RuntimeError as e:
            if not any(op in str(e) for op in DATA_OPS):
                raise  # not the data (CUDA out of memory, say): no hour-long rescan, no blame on the shards
            raise ShardError(self._diagnose(order, e)) from None
        finally:
            del pipe

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
                        return f"{path}: sample {key} is corrupt ({e}); DALI said: {first}"
            except ShardError as e:
                return f"{e}; DALI said: {first}"
        return f"{self.cfg.shards_dir}: DALI failed reading split {self.cfg.split}: {first}"
