"""Find the samples of an ILSVRC-2012 source tree, in any of its common layouts.

Every layout comes down to the same thing: a list of classes (sorted wnids, with
names where the layout carries them) and, per split, a list of `SourceSample`s,
each of which says where its bytes are: a file, or a byte range inside a tar
(the original downloads are read in place, never extracted to disk).

Layouts (docs/DESIGN.md):
  folder  SRC/train/<wnid>/*.JPEG, SRC/val/<wnid>/*.JPEG
  kaggle  SRC/ILSVRC/Data/CLS-LOC/{train/<wnid>/, val/}, SRC/LOC_val_solution.csv,
          SRC/LOC_synset_mapping.txt
  tars    SRC/ILSVRC2012_img_train.tar (a tar per class), SRC/ILSVRC2012_img_val.tar,
          SRC/ILSVRC2012_devkit_t12.tar.gz (data/meta.mat, validation ground truth)
  fall11  the ImageNet Fall 2011 release (21,841 synsets, 14M images; "ImageNet-21K"), with no
          validation split: SRC/fall11_whole.tar (a tar per synset, read in place), or one
          SRC/<wnid>.tar per synset, or one SRC/<wnid>/ folder per synset; names from SRC/words.txt
          where given. val_fraction holds out that share of each class, chosen by the seed.
"""
from __future__ import annotations

import csv
import array
import hashlib
import io
import json
import math
import os
import re
import socket
import stat
import sys
import tarfile
import zipfile
from dataclasses import dataclass, field

import numpy as np

LAYOUTS = ("folder", "kaggle", "tars", "fall11")
FALL11_TAR, WORDS = "fall11_whole.tar", "words.txt"
IMAGE_EXTS = (".jpeg", ".jpg", ".png")
TRAIN_TAR, VAL_TAR, DEVKIT = "ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar", "ILSVRC2012_devkit_t12.tar.gz"
KAGGLE_ROOT = os.path.join("ILSVRC", "Data", "CLS-LOC")
WNID = re.compile(r"^n\d{8}$")
LISTING_CACHE = "_listing-{}.npz"  # in a cache directory (make_shards' OUT): a tar of tars' listing, reused


class SourceError(Exception):
    """Bad source tree: the message names the path and what is wrong."""


@dataclass(frozen=True, slots=True)  # slots: 1.28M of these stay small
class SourceSample:
    key: str     # the shard key: the file stem made safe (shard_key), unique within its split
    wnid: str
    source: str  # where it came from, relative to SRC (tar members as tar/member)
    path: str    # the file that holds the bytes
    offset: int = 0   # byte offset of the image data in `path`
    size: int = -1    # bytes to read; -1 = the whole file

    def read(self) -> bytes:
        """The image's bytes. A tar member's header (the 512 bytes before its data) is read with them and
        must name this member and its size: a listing that does not match its tar (a cache of another
        version, entries swapped) is refused instead of giving one image another's label."""
        with open(self.path, "rb") as f:
            if self.size < 0:
                return f.read()
            f.seek(self.offset - tarfile.BLOCKSIZE)
            header = f.read(tarfile.BLOCKSIZE)
            data = f.read(self.size)
        if len(data) != self.size:
            raise OSError(f"{self.source}: tar member cut short ({len(data)} of {self.size} bytes)")
        self._check_header(header)
        return data

    def _check_header(self, header: bytes) -> None:
        member = self.source.rsplit(".tar/", 1)[-1]  # the name inside its (innermost) tar
        try:
            info = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
        except tarfile.TarError:
            info = None
        long_name = len(member.encode("utf-8", "surrogateescape")) > 99  # GNU/PAX: the header holds a stand-in
        if info is None or info.size != self.size or not (info.name == member or long_name):
            found = "no tar header" if info is None else f"the header of {info.name!r}, {info.size} bytes"
            raise ListingMismatch(f"{self.path}: the listing says {self.source} is {self.size} bytes at byte "
                                  f"{self.offset}, but the tar has {found} there")


class ListingMismatch(Exception):
    """A source listing (usually a cached one) that does not describe its tar: never an undecodable image
    to skip, always a refusal of the run."""


def _row_type(n: int):
    """int32 rows where they fit (every listing of ImageNet's), 4 bytes an image less than int64."""
    return np.int32 if n < 2**31 else np.int64


def _column(values, dtype) -> np.ndarray:
    """values as a NumPy array of dtype, sharing its memory where it can (array.array, ndarray)."""
    if isinstance(values, array.array) and np.dtype(dtype).itemsize == values.itemsize:
        return np.frombuffer(values, dtype) if len(values) else np.zeros(0, dtype)
    return np.asarray(values, dtype)


class SampleList:
    """The images of a tar of per-class tars (ILSVRC2012_img_train.tar, fall11_whole.tar) as columns: each
    image's inner tar (int32), its name in one bytes blob with end offsets (int64), its byte offset (int64)
    and size (int64); `rows` selects and orders them (int64). About 50 bytes an image plus its name, where
    SourceSample objects took about 400: Fall 2011's 14.2M images are under 1 GB in every part, not 7 GB.
    A SourceSample is made only when one is asked for (by index or by iterating)."""

    def __init__(self, path: str, inner: list[str], prefix: str, inner_of, blob: bytes, ends, offsets, sizes,
                 wnids: list[str] | None = None):
        """inner: the per-class tars' names (the classes' wnids are their stems), or with `wnids` given, the
        class of each inner_of index, every member directly in the tar at `path` (ILSVRC2012_img_val.tar)."""
        self.path = path
        self.wnids = wnids if wnids is not None else [_stem(name) for name in inner]  # one string a class
        self.heads = [f"{prefix}/"] * len(wnids) if wnids is not None else [f"{prefix}/{name}/" for name in inner]
        # Zero-copy views of the listing's compact arrays (array.array, or a cache's NumPy arrays): a copy
        # would hold the listing twice at its peak.
        self.inner_of, self.ends = _column(inner_of, np.int32), _column(ends, np.int64)
        self.offsets, self.sizes = _column(offsets, np.int64), _column(sizes, np.int32)  # a member < 2 GB
        self.blob = blob  # bytes, bytearray or a uint8 array (a cache's), never copied (only sliced)
        self.rows = np.arange(len(self.offsets), dtype=_row_type(len(self.offsets)))
        self.ordered = False  # rows in (wnid, key) order
        # every key starts with its class's wnid and "_", and every wnid is a WordNet id (one length): then key
        # order is (wnid, key) order (by_class finds out)
        self.keys_prefixed = False

    def member(self, j: int) -> str:
        start = int(self.ends[j - 1]) if j else 0
        return bytes(self.blob[start:int(self.ends[j])]).decode("utf-8", "surrogateescape")  # tarfile's decoding

    def sample(self, j: int) -> SourceSample:
        m, c = self.member(j), int(self.inner_of[j])
        return SourceSample(_key(m), self.wnids[c], self.heads[c] + m, self.path, int(self.offsets[j]), int(self.sizes[j]))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> SourceSample:
        return self.sample(int(self.rows[i]))

    def __iter__(self):
        for start in range(0, len(self.rows), 65536):  # a list of every row's int would be 36 bytes an image
            for j in self.rows[start:start + 65536].tolist():
                yield self.sample(j)

    def __eq__(self, other) -> bool:  # as the list of SourceSample it stands for
        try:
            return len(self) == len(other) and all(a == b for a, b in zip(self, other))
        except TypeError:
            return NotImplemented

    __hash__ = None

    def view(self, rows, ordered: bool = False) -> "SampleList":
        """The same columns, other rows (positions into the columns, not into this view)."""
        new = object.__new__(SampleList)
        new.__dict__.update(self.__dict__)
        new.rows, new.ordered = np.asarray(rows, _row_type(len(self.offsets))), ordered
        return new

    def by_class(self):
        """(wnid, its rows in key order) for each class in wnid order: one class's keys in memory at a time."""
        classes = self.inner_of[self.rows]
        if self.wnids == sorted(self.wnids) and not (np.diff(classes) < 0).any():
            rows = self.rows  # listed class by class in wnid order already (the tars' own order): no sort
        else:
            rank = np.empty(len(self.wnids), np.int32)
            rank[sorted(range(len(self.wnids)), key=self.wnids.__getitem__)] = np.arange(len(self.wnids))
            rows = self.rows[np.argsort(rank[classes], kind="stable")]
            classes = self.inner_of[rows]
        cuts = np.flatnonzero(np.diff(classes)) + 1
        del classes
        prefixed = all(WNID.fullmatch(w) for w in self.wnids)
        for part in np.split(rows, cuts) if len(rows) else []:
            wnid = self.wnids[int(self.inner_of[part[0]])]
            keys = [_key(self.member(j)) for j in part.tolist()]
            prefixed = prefixed and all(k.startswith(wnid + "_") for k in keys)
            yield wnid, part[sorted(range(len(part)), key=keys.__getitem__)]
        self.keys_prefixed = prefixed

    def sorted_by_class_and_key(self) -> "SampleList":
        if self.ordered:
            return self
        parts = [rows for _, rows in self.by_class()]
        new = self.view(np.concatenate(parts) if parts else self.rows, ordered=True)
        new.keys_prefixed = self.keys_prefixed
        return new

    def sorted_by_key(self) -> "SampleList":
        """Key order: (wnid, key) order where every key starts with its wnid (ImageNet's names do), else a
        sort of every key at once (the memory of a string per image, for sources named otherwise)."""
        ordered = self.sorted_by_class_and_key()
        if ordered.keys_prefixed:
            return ordered
        keys = [_key(self.member(j)) for j in ordered.rows.tolist()]
        return self.view(ordered.rows[sorted(range(len(keys)), key=keys.__getitem__)])

    def fingerprint(self, h) -> None:
        """Feed everything the listing says, in this order, to hash `h` (make_shards' listing digest): the
        columns' bytes, not a string per image (seconds at Fall 2011's size, not minutes)."""
        h.update(f"{self.path}\t{len(self.rows)}\n".encode())
        h.update("\t".join(self.wnids + self.heads).encode("utf-8", "surrogateescape"))
        for start in range(0, len(self.rows), 1 << 20):  # a million rows at a time: no column-sized temporaries
            r = self.rows[start:start + (1 << 20)]
            for column in (r, self.inner_of[r], self.offsets[r], self.sizes[r]):
                h.update(np.ascontiguousarray(column, dtype=column.dtype.newbyteorder("<")))
        h.update(self.ends)
        h.update(self.blob)


@dataclass
class Source:
    root: str
    layout: str
    classes: list[tuple[str, str]]             # (wnid, name), sorted by wnid: index = position
    splits: dict[str, list[SourceSample]] = field(default_factory=dict)
    unused: list[dict] = field(default_factory=list)  # {source, reason} of what the listing passed over
    cached: list[str] = field(default_factory=list)  # listing caches read instead of a tar's headers

    def label(self, wnid: str) -> int:
        return self._index[wnid]

    def __post_init__(self):
        self._index = {w: i for i, (w, _) in enumerate(self.classes)}


def detect_layout(root: str) -> str:
    if not os.path.isdir(root):
        raise SourceError(f"{root}: no such directory")
    if os.path.exists(os.path.join(root, TRAIN_TAR)) or os.path.exists(os.path.join(root, VAL_TAR)):
        return "tars"
    if os.path.isdir(os.path.join(root, KAGGLE_ROOT)):
        return "kaggle"
    if os.path.isdir(os.path.join(root, "train")) or os.path.isdir(os.path.join(root, "val")):
        return "folder"
    if os.path.exists(os.path.join(root, FALL11_TAR)) or any(WNID.match(_stem(n)) for n in os.listdir(root)):
        return "fall11"
    raise SourceError(f"{root}: unknown layout: expected train/ and val/ class folders, "
                      f"{KAGGLE_ROOT}/ (Kaggle), {TRAIN_TAR} / {VAL_TAR} (original downloads), or the Fall "
                      f"2011 release ({FALL11_TAR}, <wnid>.tar files or <wnid>/ folders)")


class _Listing:
    """What a folder listing decides, and what it passes over (named in the summary and the manifest);
    where tar listings are cached (cache_dir), and which caches it read (cached)."""

    def __init__(self, root: str, any_class_names: bool, cache_dir: str | None = None):
        self.root, self.any_class_names, self.unused = root, any_class_names, []
        self.cache_dir, self.cached = cache_dir, []

    def skip(self, path: str, reason: str) -> None:
        self.unused.append({"source": os.path.relpath(path, self.root), "reason": reason})


_listing = _Listing("", False)  # the listing in progress (open_source sets it; the readers use it)


def open_source(root: str, splits=("train", "val"), layout: str = "auto", any_class_names: bool = False,
                val_fraction: float = 0.0, seed: int = 0, cache_dir: str | None = None) -> Source:
    """The source's classes and samples. Class folders must be named by WordNet ids (n01440764)
    unless any_class_names; hidden folders and files that are not images are passed over and
    listed in `unused`; anything that is not a regular file (a pipe, a device) is refused.
    val_fraction (the fall11 layout only, which has no val split): the share of each class held
    out as val, chosen by `seed`. cache_dir: where the listing of a tar of tars (fall11_whole.tar,
    ILSVRC2012_img_train.tar) is kept and found again while the tar is unchanged (_tar_of_tars)."""
    global _listing
    layout = detect_layout(root) if layout == "auto" else layout
    if layout not in LAYOUTS:
        raise SourceError(f"{root}: unknown layout {layout!r}")
    if layout == "fall11" and not val_fraction:
        raise SourceError(f"{root}: the Fall 2011 release has no validation split: give --val-fraction F (the share "
                          "of each class held out; 0.5 is the paper's half for training, half for testing)")
    if layout != "fall11" and val_fraction:
        raise SourceError(f"{root}: --val-fraction is for the Fall 2011 release; the {layout} layout has its own "
                          "val split")
    _listing = _Listing(root, any_class_names, cache_dir)
    if layout == "fall11":
        src = _read_fall11(root, tuple(splits), val_fraction, seed)
    else:
        reader = {"folder": _read_folder, "kaggle": _read_kaggle, "tars": _read_tars}[layout]
        src = reader(root, tuple(splits))
    src.cached = _listing.cached
    src.unused = sorted({u["source"]: u for u in _listing.unused}.values(), key=lambda u: u["source"])  # listed once
    # One canonical order per split, whatever the layout, tar member order or file
    # system listing: the same images then give the same shards from any layout.
    for split, order in (("train", "class_and_key"), ("val", "key")):  # val: ILSVRC2012_val_<n> order
        samples = src.splits.get(split)
        if isinstance(samples, SampleList):
            src.splits[split] = samples.sorted_by_class_and_key() if order == "class_and_key" else samples.sorted_by_key()
        elif samples is not None:
            samples.sort(key=(lambda s: (s.wnid, s.key)) if order == "class_and_key" else (lambda s: s.key))
    for split, samples in src.splits.items():
        _check_keys(root, split, samples)
        wnids = samples.wnids if isinstance(samples, SampleList) else {s.wnid for s in samples}
        for w in wnids:
            if w not in src._index:
                where = next(s.source for s in samples if s.wnid == w)
                raise SourceError(f"{os.path.join(root, where)}: class {w} is not among the {len(src.classes)} classes")
    return src


def _stem(name: str) -> str:
    base = os.path.basename(name)
    return base[: base.rfind(".")] if "." in base else base


SAFE_KEY = re.compile(r"[A-Za-z0-9_-]{1,64}")


def shard_key(stem: str) -> str:
    """A file stem as a sample key that both shard formats take whatever the name: the stem itself where
    it is plain (every ILSVRC name is), else its plain characters and a hash of the whole stem.

    A tar member name holds 100 bytes (ustar; the key plus '.json' must fit), DALI's index splits its
    lines at spaces, and webdataset cuts the key at the first dot: 'my photo.v2' or a 150-byte name
    would break one of them. The original path is kept in the sample's .json (`source`)."""
    if SAFE_KEY.fullmatch(stem):
        return stem
    plain = re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_")[:40]
    return f"{plain}-{hashlib.sha256(stem.encode('utf-8', 'surrogateescape')).hexdigest()[:16]}"


def _key(name: str) -> str:
    return shard_key(_stem(name))


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTS)


def _check_keys(root: str, split: str, samples) -> None:
    """No two images of a split with one key. Through a 64-bit hash of each key (8 bytes an image, not a
    dictionary of strings), then the keys of the hashes that repeat compared as strings."""
    if not len(samples):
        return
    hashes = np.fromiter((hash(s.key) for s in samples), np.int64, len(samples))
    hashes.sort()  # in place: no second array the size of the split
    repeated = set(hashes[1:][hashes[1:] == hashes[:-1]].tolist())
    if not repeated:
        return
    seen: dict[str, str] = {}
    for s in samples:
        if hash(s.key) in repeated:
            if s.key in seen:
                raise SourceError(f"{os.path.join(root, s.source)}: same stem as {seen[s.key]} in split {split}")
            seen[s.key] = s.source


def _list_class_dirs(root: str, split_dir: str) -> list[str]:
    path = os.path.join(root, split_dir)
    if not os.path.isdir(path):
        raise SourceError(f"{path}: missing directory")
    wnids = []
    for d in sorted(os.listdir(path)):
        full = os.path.join(path, d)
        if d.startswith("."):  # .ipynb_checkpoints, .DS_Store, .git: never a class
            _listing.skip(full, "hidden, not a class")
        elif not os.path.isdir(full):
            _listing.skip(full, "not in a class folder")
        elif WNID.match(d) or _listing.any_class_names:
            wnids.append(d)
        else:
            raise SourceError(f"{full}: class folder name is not a WordNet id like n01440764 (pass "
                              "--any-class-names to take folder names as classes)")
    if not wnids:
        raise SourceError(f"{path}: no class folders")
    return wnids


def _files_in(root: str, rel_dir: str, wnid: str | None) -> list[SourceSample]:
    d = os.path.join(root, rel_dir)
    names = []
    for n in sorted(os.listdir(d)):
        path = os.path.join(d, n)
        if n.startswith("."):
            _listing.skip(path, "hidden, not an image")
        elif not _is_image(n):
            _listing.skip(path, f"not an image make_shards reads ({', '.join(IMAGE_EXTS)})")
        elif not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO would block the reader for good
            raise SourceError(f"{path}: not a regular file (a pipe, a device or a folder); remove it")
        else:
            names.append(n)
    if not names:
        raise SourceError(f"{d}: no images (empty class folder)")
    return [SourceSample(_key(n), wnid or "", os.path.join(rel_dir, n), os.path.join(d, n)) for n in names]


def _read_folder(root: str, splits) -> Source:
    # The class list comes from train/ even when only val is wanted, so that the
    # labels of a val-only run match those of the full one.
    classes = _list_class_dirs(root, "train" if os.path.isdir(os.path.join(root, "train")) else "val")
    out = {}
    for split in splits:
        wnids = _list_class_dirs(root, split)
        extra = sorted(set(wnids) - set(classes))
        if extra:
            raise SourceError(f"{os.path.join(root, split, extra[0])}: class folder not in train/")
        out[split] = [s for w in wnids for s in _files_in(root, os.path.join(split, w), w)]
    names = _synset_names(os.path.join(root, "LOC_synset_mapping.txt"))
    return Source(root, "folder", [(w, names.get(w, w)) for w in classes], out)


def _synset_names(path: str) -> dict[str, str]:
    if not os.path.exists(path):
        return {}
    names = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            wnid, _, name = line.strip().partition(" ")
            if not WNID.match(wnid):
                raise SourceError(f"{path}:{n}: expected '<wnid> <name>', got {line.strip()[:60]!r}")
            names[wnid] = name or wnid
    return names


def _read_kaggle(root: str, splits) -> Source:
    mapping = os.path.join(root, "LOC_synset_mapping.txt")
    if not os.path.exists(mapping):
        raise SourceError(f"{mapping}: missing (the Kaggle layout needs it for the class list)")
    names = _synset_names(mapping)
    classes = sorted(names)
    out = {}
    if "train" in splits:
        wnids = _list_class_dirs(root, os.path.join(KAGGLE_ROOT, "train"))
        unknown = sorted(set(wnids) - set(classes))
        if unknown:
            raise SourceError(f"{os.path.join(root, KAGGLE_ROOT, 'train', unknown[0])}: class not in {mapping}")
        out["train"] = [s for w in wnids for s in _files_in(root, os.path.join(KAGGLE_ROOT, "train", w), w)]
    if "val" in splits:
        solution = os.path.join(root, "LOC_val_solution.csv")
        if not os.path.exists(solution):
            raise SourceError(f"{solution}: missing (the Kaggle layout's validation labels)")
        truth, line_of = {}, {}
        with open(solution, newline="", encoding="utf-8") as f:
            for n, row in enumerate(csv.reader(f)):
                if n == 0 or not row:
                    continue
                if len(row) != 2 or not row[1].split():
                    raise SourceError(f"{solution}:{n + 1}: expected 'ImageId,PredictionString'")
                label = row[1].split()[0]
                if truth.get(row[0], label) != label:
                    raise SourceError(f"{solution}:{n + 1}: labels {row[0]} {label}, but line {line_of[row[0]]} "
                                      f"labelled it {truth[row[0]]}")
                truth[row[0]] = label
                line_of.setdefault(row[0], n + 1)
        samples = _files_in(root, os.path.join(KAGGLE_ROOT, "val"), None)
        missing = [_stem(s.source) for s in samples if _stem(s.source) not in truth]
        if missing:
            raise SourceError(f"{solution}: no label for {len(missing)} val file(s), e.g. {missing[0]}")
        if len(truth) != len(samples):
            extra = sorted(set(truth) - {_stem(s.source) for s in samples})
            raise SourceError(f"{solution}: {len(extra)} label(s) for val files that do not exist, e.g. {extra[0]}")
        out["val"] = [SourceSample(s.key, truth[_stem(s.source)], s.source, s.path) for s in samples]
    return Source(root, "kaggle", [(w, names[w]) for w in classes], out)


def _read_devkit(path: str) -> tuple[list[tuple[str, str]], dict[int, str], list[int]]:
    """(leaf classes sorted by wnid, ILSVRC2012_ID -> wnid, validation ground-truth IDs)."""
    import scipy.io

    if not os.path.exists(path):
        raise SourceError(f"{path}: missing (the devkit holds the class list and val labels)")
    meta = gt = None
    try:
        with tarfile.open(path, "r:gz") as tf:
            for m in tf:
                if m.name.endswith("data/meta.mat"):
                    meta = tf.extractfile(m).read()
                elif m.name.endswith("data/ILSVRC2012_validation_ground_truth.txt"):
                    gt = tf.extractfile(m).read().decode()
    except (tarfile.TarError, OSError, EOFError) as e:
        raise SourceError(f"{path}: unreadable devkit archive ({e})") from None
    if meta is None or gt is None:
        raise SourceError(f"{path}: lacks data/meta.mat or data/ILSVRC2012_validation_ground_truth.txt")
    id_to_wnid, names = {}, {}
    try:
        synsets = scipy.io.loadmat(io.BytesIO(meta), squeeze_me=True)["synsets"]
        for s in synsets:
            if int(s["num_children"]) == 0:  # the leaves are the classification classes
                id_to_wnid[int(s["ILSVRC2012_ID"])] = str(s["WNID"])
                names[str(s["WNID"])] = str(s["words"])
    except Exception as e:  # noqa: BLE001 - scipy raises many kinds on a damaged file: one answer
        raise SourceError(f"{path}: data/meta.mat is not the devkit's synset table ({type(e).__name__}: "
                          f"{str(e)[:80]})") from None
    try:
        gt_ids = [int(x) for x in gt.split()]
    except ValueError:
        raise SourceError(f"{path}: data/ILSVRC2012_validation_ground_truth.txt is not a list of class IDs") from None
    bad = [i for i in gt_ids if i not in id_to_wnid]
    if bad:
        raise SourceError(f"{path}: validation ground truth names class ID {bad[0]}, not a leaf synset of meta.mat")
    return sorted(names.items()), id_to_wnid, gt_ids


def _new_columns() -> tuple:
    """(image names' bytes end to end, where each ends, byte offsets, sizes): empty compact arrays."""
    return bytearray(), array.array("q"), array.array("q"), array.array("i")


def _add_members(tar: tarfile.TarFile, base: int, columns: tuple, where: str) -> int:
    """Appends each image member of `tar` (read header by header) to `columns` (_new_columns), at byte
    `base` + its offset; returns how many. tarfile keeps every TarInfo it has read: one at a time here."""
    blob, ends, offsets, sizes = columns
    found = len(offsets)
    for m in tar:
        if m.isfile() and _is_image(m.name):
            blob += m.name.encode("utf-8", "surrogateescape")  # tarfile's own decoding, undone
            ends.append(len(blob))
            offsets.append(base + m.offset_data)
            try:
                sizes.append(m.size)
            except OverflowError:
                raise SourceError(f"{where}/{m.name}: {m.size} bytes, not an image") from None
        tar.members.clear()
    return len(offsets) - found


def _tar_columns(path: str) -> tuple:
    """_new_columns of a tar's image members, from its headers."""
    columns = _new_columns()
    try:
        with tarfile.open(path, "r:") as tf:
            _add_members(tf, 0, columns, path)
    except (tarfile.TarError, OSError) as e:
        raise SourceError(f"{path}: unreadable tar ({e})") from None
    return columns


def _tar_members(path: str, source_prefix: str) -> list[SourceSample]:
    """Image members of a (seekable) tar, as byte ranges of the file; reads headers only."""
    out = []
    try:
        with tarfile.open(path, "r:") as tf:
            for m in tf:
                if m.isfile() and _is_image(m.name):
                    out.append(SourceSample(_key(m.name), "", f"{source_prefix}/{m.name}", path, m.offset_data, m.size))
    except (tarfile.TarError, OSError) as e:
        raise SourceError(f"{path}: unreadable tar ({e})") from None
    return out


def _read_tars(root: str, splits) -> Source:
    classes, id_to_wnid, gt_ids = _read_devkit(os.path.join(root, DEVKIT))
    out = {}
    if "train" in splits:
        path = os.path.join(root, TRAIN_TAR)
        if not os.path.exists(path):
            raise SourceError(f"{path}: missing")
        samples = _tar_of_tars(path, TRAIN_TAR)
        out["train"] = samples
    if "val" in splits:
        path = os.path.join(root, VAL_TAR)
        if not os.path.exists(path):
            raise SourceError(f"{path}: missing")
        blob, ends, offsets, sizes = _tar_columns(path)
        if len(offsets) != len(gt_ids):
            raise SourceError(f"{os.path.join(root, DEVKIT)}: validation ground truth has {len(gt_ids)} labels "
                              f"but {path} has {len(offsets)} images")
        # Ground-truth line n labels ILSVRC2012_val_<n>: map through meta.mat's IDs. Columns, as the train
        # split's: the class of each image by index (the split is sorted by key in open_source).
        wnids = [w for w, _ in classes]
        index = {w: c for c, w in enumerate(wnids)}
        val = SampleList(path, [], VAL_TAR, np.zeros(len(offsets), np.int32), blob, ends, offsets, sizes,
                         wnids=wnids)  # its class column filled in below, in place
        val.inner_of[:] = np.fromiter((index.get(id_to_wnid.get(gt_ids[_val_number(val[j], path) - 1]), -1)
                                       for j in range(len(offsets))), np.int32, len(offsets))
        if len(val) and val.inner_of.min() < 0:
            j = int(np.argmin(val.inner_of))
            raise SourceError(f"{os.path.join(root, DEVKIT)}: the ground truth labels {val[j].source} with a "
                              "class that is not among the devkit's leaf classes")
        out["val"] = val
    return Source(root, "tars", classes, out)


def _tar_of_tars(path: str, prefix: str) -> list[SourceSample]:
    """The images of a tar of per-class tars (ILSVRC2012_img_train.tar, fall11_whole.tar), each inner
    tar named <wnid>.tar, as byte ranges of the outer file: headers are read in place, nothing extracted.
    With a cache directory, the listing is read from there while the tar keeps its path, size and mtime
    (listing_cache), and written there after a listing of the headers."""
    meta = _listing_meta(path, prefix)  # before listing: a tar changed meanwhile is listed again next time
    cache = _listing.cache_dir and listing_cache(meta, _listing.cache_dir)
    columns = _read_listing(cache, meta) if cache else None
    if columns is None:
        columns = _list_tar_of_tars(path)
        if cache:
            _write_listing(cache, columns, meta)
    else:
        _listing.cached.append(cache)
    inner, inner_of, blob, ends, offsets, sizes = columns
    return SampleList(path, inner, prefix, inner_of, blob, ends, offsets, sizes)


def _list_tar_of_tars(path: str) -> tuple:
    """(inner tar names, each image's inner tar by index, the image names' bytes end to end, where each
    name ends, byte offsets in the outer file, sizes), from the tar's headers. Built in compact arrays
    (array module): no Python object per image, even while listing."""
    inner, inner_of = [], array.array("i")
    columns = _new_columns()
    try:
        with tarfile.open(path, "r:") as outer:
            inner_tars = [m for m in outer if m.isfile() and m.name.endswith(".tar")]
            if not inner_tars:
                raise SourceError(f"{path}: holds no per-class .tar files")
            for m in sorted(inner_tars, key=lambda m: m.name):
                # An inner tar is a byte range of the outer one: read its headers
                # in place (tarfile over a window of the file), never extracting.
                window = _FileWindow(path, m.offset_data, m.size)
                with tarfile.open(fileobj=window, mode="r:") as tar:
                    found = _add_members(tar, m.offset_data, columns, f"{path}/{m.name}")
                if not found:
                    raise SourceError(f"{path}/{m.name}: no images (empty class)")
                inner_of.extend(array.array("i", [len(inner)]) * found)
                inner.append(m.name)
    except (tarfile.TarError, OSError) as e:
        raise SourceError(f"{path}: unreadable tar ({e})") from None
    return (inner, inner_of, *columns)


def listing_cache(meta: dict, cache_dir: str) -> str:
    """The cache file of a tar's listing: named by the tar's absolute path, size and mtime (_listing_meta),
    so that a tar replaced or rewritten is listed again."""
    digest = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()
    return os.path.join(cache_dir, LISTING_CACHE.format(digest[:16]))


def _listing_meta(path: str, prefix: str) -> dict:
    try:
        st = os.stat(path)
    except OSError as e:
        raise SourceError(f"{path}: cannot read ({e.strerror})") from None
    return {"format": 1, "tar": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "prefix": prefix}


def _write_listing(cache: str, columns: tuple, meta: dict) -> None:
    """_list_tar_of_tars' columns as arrays (about 50 bytes an image), written to a temporary name and
    renamed. A cache that cannot be written is no error: the next run lists the headers again."""
    inner, inner_of, blob, ends, offsets, sizes = columns
    tmp = f"{cache}.tmp-{socket.gethostname()}-{os.getpid()}"  # parts on several nodes may write it at once
    try:
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        with open(tmp, "wb") as f:
            # the columns as they lie (zero-copy views): a copy here was the listing's peak
            np.savez(f, meta=np.array(json.dumps(meta, sort_keys=True)),
                     inner=np.array(json.dumps(inner)), inner_of=_column(inner_of, np.int32),
                     names=np.frombuffer(blob, np.uint8) if len(blob) else np.zeros(0, np.uint8),
                     name_ends=_column(ends, np.int64), offsets=_column(offsets, np.int64),
                     sizes=_column(sizes, np.int32))
        os.replace(tmp, cache)
    except OSError:
        if os.path.exists(tmp):
            os.remove(tmp)


def _read_listing(cache: str, meta: dict) -> tuple | None:
    """_list_tar_of_tars' columns from a cache written for the tar as `meta` describes it; None when there
    is none, or it is damaged or for another tar (the headers are then listed again)."""
    try:
        with np.load(cache, allow_pickle=False) as z:
            if json.loads(str(z["meta"])) != meta:
                return None
            inner, inner_of = json.loads(str(z["inner"])), np.asarray(z["inner_of"], np.int32)  # no copies
            blob, ends = z["names"], np.asarray(z["name_ends"], np.int64)
            offsets, sizes = np.asarray(z["offsets"], np.int64), np.asarray(z["sizes"], np.int32)
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile):
        return None
    if not (len(inner_of) == len(ends) == len(offsets) == len(sizes)) or (len(ends) and ends[-1] != len(blob)) \
            or (len(inner_of) and not (0 <= inner_of.min() and inner_of.max() < len(inner))) \
            or (len(ends) > 1 and (np.diff(ends) <= 0).any()):
        return None  # arrays that do not fit together (the zip's CRCs catch damaged bytes first)
    return inner, inner_of, blob, ends, offsets, sizes


def held_out(n: int, fraction: float, seed: int, wnid: str) -> set[int]:
    """Which of a class's n images (in key order) are val: round(fraction * n) of them (halves up), at
    most n - 1,
    drawn by a generator seeded with (seed, the class), so the choice does not depend on any other
    class, on the workers or on the listing order."""
    count = min(math.floor(fraction * n + 0.5), n - 1)  # never a class's every image: one stays for training
    class_seed = int(wnid[1:]) if WNID.match(wnid) else int.from_bytes(hashlib.sha256(wnid.encode()).digest()[:8], "big")
    return set(np.random.default_rng([seed, class_seed]).permutation(n)[:count].tolist())


def _words(root: str) -> dict[str, str]:
    """wnid -> its first name, from words.txt ('<wnid>\t<name>, <name>, ...') where the source has it."""
    path = os.path.join(root, WORDS)
    names = {}
    if os.path.exists(path):
        with open(path, encoding="utf-8", errors="replace") as f:
            for n, line in enumerate(f, 1):
                wnid, _, words = line.rstrip("\n").partition("\t")
                if not WNID.match(wnid):
                    raise SourceError(f"{path}:{n}: expected '<wnid>\\t<names>', got {line.strip()[:60]!r}")
                names[wnid] = words.split(",")[0].strip() or wnid
    return names


def _read_fall11(root: str, splits, val_fraction: float, seed: int) -> Source:
    whole = os.path.join(root, FALL11_TAR)
    if os.path.exists(whole):
        samples = _tar_of_tars(whole, FALL11_TAR)
        for name in sorted(os.listdir(root)):  # never read beside it: named, so no synset goes without a word
            path = os.path.join(root, name)
            if name != FALL11_TAR and not name.startswith(".") and (name.endswith(".tar") or os.path.isdir(path)):
                _listing.skip(path, f"beside {FALL11_TAR}, which is read instead")
    else:
        samples = []
        for name in sorted(os.listdir(root)):
            path = os.path.join(root, name)
            if name.startswith("."):
                _listing.skip(path, "hidden, not a class")
            elif name.endswith(".tar") and (WNID.match(_stem(name)) or _listing.any_class_names):
                members = _tar_members(path, name)
                if not members:
                    raise SourceError(f"{path}: no images (empty class)")
                samples += [SourceSample(m.key, _stem(name), m.source, m.path, m.offset, m.size) for m in members]
            elif os.path.isdir(path) and (WNID.match(name) or _listing.any_class_names):
                samples += _files_in(root, name, name)
            elif name != WORDS:
                _listing.skip(path, "not a synset's .tar or folder")
    if not samples:
        raise SourceError(f"{root}: no synsets ({FALL11_TAR}, <wnid>.tar files or <wnid>/ folders)")
    columns = isinstance(samples, SampleList)  # fall11_whole.tar: rows of columns, never an object per image
    out, rows, classes, capped = {split: [] for split in splits}, {split: [] for split in splits}, [], []
    for wnid, members in (samples.by_class() if columns else _by_class(samples)):  # wnid order, key order
        n = len(members)
        classes.append(wnid)
        if math.floor(val_fraction * n + 0.5) >= n:
            capped.append((wnid, n))
        is_val = np.zeros(n, bool)
        is_val[sorted(held_out(n, val_fraction, seed, wnid))] = True
        for split, chosen in (("train", ~is_val), ("val", is_val)):
            if split in out:
                if columns:
                    rows[split].append(members[chosen])
                else:
                    out[split] += [m for m, keep in zip(members, chosen.tolist()) if keep]
    if columns:
        out = {split: samples.view(np.concatenate(r) if r else np.zeros(0, np.int64), ordered=True)
               for split, r in rows.items()}
    if capped:
        print(f"make_shards: {len(capped)} synset(s) too small for --val-fraction {val_fraction:g} to leave an image "
              f"for training keep one ({', '.join(f'{w}: {n} image(s)' for w, n in capped[:3])}"
              f"{' ...' if len(capped) > 3 else ''})", file=sys.stderr)
    names = _words(root)
    if not names:
        print(f"make_shards: {os.path.join(root, WORDS)}: not found; the class names are the wnids",
              file=sys.stderr)
    return Source(root, "fall11", [(w, names.get(w, w)) for w in classes], out)


def _by_class(samples: list[SourceSample]):
    """(wnid, its samples in key order) for each class in wnid order."""
    by_class: dict[str, list[SourceSample]] = {}
    for sample in samples:
        by_class.setdefault(sample.wnid, []).append(sample)
    for wnid in sorted(by_class):
        yield wnid, sorted(by_class[wnid], key=lambda m: m.key)


def _val_number(s: SourceSample, path: str) -> int:
    m = re.search(r"(\d+)$", _stem(s.source))
    if not m:
        raise SourceError(f"{path}/{s.source}: val file name has no ILSVRC2012_val_<number>")
    return int(m.group(1))


class _FileWindow(io.RawIOBase):
    """A read-only, seekable view of bytes [start, start+size) of a file."""

    def __init__(self, path: str, start: int, size: int):
        self._f = open(path, "rb")
        self._start, self._size, self._pos = start, size, 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def tell(self):
        return self._pos

    def seek(self, pos, whence=0):
        self._pos = {0: pos, 1: self._pos + pos, 2: self._size + pos}[whence]
        return self._pos

    def readinto(self, b):
        n = max(0, min(len(b), self._size - self._pos))
        self._f.seek(self._start + self._pos)
        data = self._f.read(n)
        b[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def close(self):
        self._f.close()
        super().close()
