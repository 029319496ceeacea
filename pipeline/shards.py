"""The shard format (version 1, docs/DESIGN.md): writing and reading.

A shard is a plain POSIX (ustar) tar; the members of one sample are
`<key>.jpg`, `<key>.cls`, `<key>.json`, adjacent. Beside each tar is the DALI
index (`.idx`, the format of DALI's wds2idx: a header `v1.2 <samples>`, then a
line per sample of `<ext> <data offset> <size> <member name>` groups). The shard
directory is described by `dataset.json`, written last.

This module imports neither DALI nor torch: tools, the pipeline and tests share it.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import tarfile
from dataclasses import dataclass

FORMAT_VERSION = 1
MANIFEST = "dataset.json"
PCA_FILE = "pca.json"
INDEX_VERSION = "v1.2"
TAR_BLOCK = 512
MEMBER_EXTS = ("jpg", "cls", "json")  # the order of a sample's members in the tar
# Fixed tar metadata, so the same samples always give byte-identical tars.
_MTIME = 0


class ShardError(Exception):
    """A shard directory or shard that does not match its contract; names the file."""


JPEG_SOI = b"\xff\xd8\xff"  # start-of-image marker and the next marker's first byte: every JPEG opens so


def error_text(error: Exception) -> str:
    """An exception as one line, without the address PIL puts in its in-memory file's name
    ('<_io.BytesIO object at 0x7f...>'): messages and manifests must not differ between identical runs."""
    text = f"{type(error).__name__}: {error}".replace("\n", " ")
    return re.sub(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "the file", text)


def shard_name(split: str, number: int) -> str:
    return f"{split}-{number:06d}.tar"


def index_name(tar_name: str) -> str:
    return tar_name[: -len(".tar")] + ".idx"


@dataclass(frozen=True)
class IndexEntry:
    """One sample of a shard: its key and where each member's bytes lie in the tar."""
    key: str
    members: tuple[tuple[str, int, int], ...]  # (ext, data offset, size)

    def line(self) -> str:
        return " ".join(f"{ext} {off} {size} {self.key}.{ext}" for ext, off, size in self.members)

    def member(self, ext: str) -> tuple[int, int]:
        for e, off, size in self.members:
            if e == ext:
                return off, size
        raise KeyError(ext)


def _header_template() -> bytes:
    info = tarfile.TarInfo("x")
    info.size, info.mtime, info.mode = 0, _MTIME, 0o644
    return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")


_HEADER = _header_template()
# The template with its name, size and checksum fields blanked: every header is these
# bytes plus a name and a size, and its checksum this sum plus theirs.
_BLANK = bytearray(_HEADER)
_BLANK[0:100], _BLANK[124:136], _BLANK[148:156] = bytes(100), bytes(12), b" " * 8
_BLANK = bytes(_BLANK)
_BLANK_SUM = sum(_BLANK)


def ustar_header(name: str, size: int) -> bytes:
    """The 512-byte ustar header tarfile writes for a regular file (mode 644, mtime 0, uid 0),
    from a fixed template: 1 us against TarInfo.tobuf's 16 us, which cost 5 % of make_shards' time."""
    raw = name.encode()
    if len(raw) >= 100:
        raise ValueError(f"member name {name!r} too long for a ustar header")
    size_field = b"%011o\0" % size
    checksum = _BLANK_SUM + sum(raw) + sum(size_field)
    return b"".join((raw.ljust(100, b"\0"), _BLANK[100:124], size_field, _BLANK[136:148],
                     b"%06o\0 " % checksum, _BLANK[156:]))


def pack_sample(key: str, jpg: bytes, label: int, meta: dict) -> tuple[bytes, tuple]:
    """The tar members of one sample as bytes, and (ext, data offset, size) relative to them.

    ustar members do not depend on where they sit in the archive, so workers can
    pack samples and the shard writer only concatenates (cheap in the main process).
    """
    parts, members, at = [], [], 0
    for ext, data in zip(MEMBER_EXTS, (jpg, str(label).encode(), json_bytes(meta))):
        header = ustar_header(f"{key}.{ext}", len(data))  # one 512-byte block
        pad = -len(data) % TAR_BLOCK
        parts += [header, data, b"\0" * pad]
        members.append((ext, at + len(header), len(data)))
        at += len(header) + len(data) + pad
    return b"".join(parts), tuple(members)


class ShardWriter:
    """Builds one shard in memory (a shard is tens of MB), then writes it atomically."""

    def __init__(self):
        self._parts: list[bytes] = []
        self._size = 0
        self._sha = hashlib.sha256()
        self.entries: list[IndexEntry] = []

    def add(self, key: str, jpg: bytes, label: int, meta: dict) -> None:
        self.add_packed(key, *pack_sample(key, jpg, label, meta))

    def add_packed(self, key: str, blob: bytes, members: tuple) -> None:
        self.entries.append(IndexEntry(key, tuple((e, self._size + off, n) for e, off, n in members)))
        self._parts.append(blob)
        self._sha.update(blob)
        self._size += len(blob)

    def index_text(self) -> str:
        return index_text(self.entries)

    def finish(self, tar_path: str) -> dict:
        """Write `<tar_path>` and its `.idx` (each to a temporary name, then renamed)."""
        # End of archive: two zero blocks, then zeros up to a whole 20-block record (as tar and tarfile do).
        end = 2 * TAR_BLOCK
        end += -(self._size + end) % (20 * TAR_BLOCK)
        self._parts.append(b"\0" * end)
        self._sha.update(self._parts[-1])
        self._size += end
        # No fsync here: a killed process loses nothing that reached the page cache, a rerun
        # re-verifies every shard's sha256, and make_shards flushes each shard before its manifest.
        atomic_write(index_name(tar_path), self.index_text().encode(), fsync=False)
        atomic_write(tar_path, self._parts, fsync=False)  # the tar last: a tar implies its index
        return {"file": os.path.basename(tar_path), "samples": len(self.entries), "bytes": self._size,
                "sha256": self._sha.hexdigest()}


def index_text(entries) -> str:
    return f"{INDEX_VERSION} {len(entries)}\n" + "".join(e.line() + "\n" for e in entries)


def read_index(path: str) -> list[IndexEntry]:
    try:
        with open(path, encoding="utf-8") as f:
            header = f.readline().split()
            lines = f.read().splitlines()
    except OSError as e:
        raise ShardError(f"{path}: cannot read index ({e.strerror})") from None
    if len(header) != 2 or header[0] != INDEX_VERSION or not header[1].isdigit() or int(header[1]) != len(lines):
        raise ShardError(f"{path}: not a DALI webdataset index ({INDEX_VERSION} header and one line per sample)")
    entries = []
    for n, line in enumerate(lines, 2):
        parts = line.split()
        if not parts or len(parts) % 4:
            raise ShardError(f"{path}:{n}: expected groups of '<ext> <offset> <size> <name>'")
        members = tuple((parts[i], int(parts[i + 1]), int(parts[i + 2])) for i in range(0, len(parts), 4))
        entries.append(IndexEntry(parts[3].rsplit(".", 1)[0], members))
    return entries


def json_bytes(obj) -> bytes:
    """Canonical JSON: sorted keys, no spaces that vary, so files are byte-identical across runs."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def atomic_write(path: str, data: bytes | list[bytes], fsync: bool = True) -> None:
    """Write to `<path>.tmp-<pid>`, rename: a reader never sees a partial file.

    `data` may be a list of chunks, written in turn (a shard's samples: joining them
    first would copy tens of MB). fsync=False leaves durability to the caller:
    make_shards flushes each shard from a background thread (a per-file fsync in
    the worker cost ~10 ms a shard here)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            if isinstance(data, list):
                f.writelines(data)
            else:
                f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk, a signal: no temporary file is left behind to look like output
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


class LockHeld(Exception):
    """hold_lock: another live process holds the lock; args[0] is what it wrote there (its pid)."""


def hold_lock(path: str) -> tuple[int, str]:
    """flock(2) the file at `path` (made if missing) for as long as the returned descriptor stays open, and
    write this process's pid into it for people: (descriptor, what the file held before, e.g. a dead
    process's pid). LockHeld where a live process holds it; the kernel lets go of a dead one's lock."""
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 64).decode(errors="replace").strip()
        os.close(fd)
        raise LockHeld(holder) from None
    left = os.read(fd, 64).decode(errors="replace").strip()
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd, left


def let_go(path: str, fd: int) -> None:
    """Removes a hold_lock file, then closes its descriptor (in that order: no window where another process
    could take the file and then lose it to the removal)."""
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)
    os.close(fd)


def check_writable(path: str) -> None:
    """OSError (with the path) unless a file can be created in PATH's directory now: asked before hours of
    work whose result goes there. A real write, not os.access: root passes os.access on a read-only mount."""
    directory = os.path.dirname(os.path.abspath(path))
    probe = os.path.join(directory, f".write-test-{os.getpid()}")
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as e:
        raise OSError(e.errno, e.strerror, directory) from None
    os.close(fd)
    os.remove(probe)


def sha256_file(path: str, chunk: int = 1 << 22, start: int = 0) -> str:
    """sha256 of the file's bytes from `start` on."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(start)
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def load_manifest(shards_dir: str) -> dict:
    path = os.path.join(shards_dir, MANIFEST)
    if not os.path.isdir(shards_dir):
        raise ShardError(f"{shards_dir}: no such shard directory")
    if not os.path.exists(path):
        raise ShardError(f"{path}: missing: {shards_dir} is not a finished shard directory "
                         "(make_shards writes dataset.json last; rerun it to finish)")
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise ShardError(f"{path}: unreadable manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        version = manifest.get("format_version") if isinstance(manifest, dict) else None
        raise ShardError(f"{path}: format_version {version!r}, this code reads {FORMAT_VERSION}")
    for key, kind in (("classes", list), ("splits", dict), ("preprocessing", dict)):
        if not isinstance(manifest.get(key), kind):
            raise ShardError(f"{path}: no {key!r} {kind.__name__} (not written by make_shards, or damaged)")
    if not isinstance(manifest["preprocessing"].get("size"), int):
        raise ShardError(f"{path}: preprocessing has no image 'size' (not written by make_shards, or damaged)")
    return manifest


def split_shards(manifest: dict, shards_dir: str, split: str) -> list[dict]:
    """The manifest's shard records of a split, with `path` and `index` filled in."""
    splits = manifest.get("splits", {})
    if split not in splits:
        raise ShardError(f"{os.path.join(shards_dir, MANIFEST)}: has no split {split!r} (has {sorted(splits)})")
    return [dict(s, path=os.path.join(shards_dir, s["file"]), index=os.path.join(shards_dir, index_name(s["file"])))
            for s in splits[split]["shards"]]


_ZERO_BLOCK = bytes(TAR_BLOCK)


def iter_tar_files(data: bytes, path: str):
    """(name, bytes) of each regular file of an in-memory ustar tar, in order.

    A strict reader of what ShardWriter writes (plain ustar headers, checksummed,
    ended by a zero block), 10x cheaper than tarfile: tarfile's per-member Python
    costs ~30 us, a fifth of a 256x256 JPEG decode. Anything else is a ShardError
    naming `path`: a bad checksum, a member cut short, a missing end, pax or GNU
    extension headers (which our shards never contain)."""
    pos, end = 0, len(data)
    while pos + TAR_BLOCK <= end:
        header = data[pos:pos + TAR_BLOCK]
        if header == _ZERO_BLOCK:
            return
        try:
            stored = int(header[148:156].replace(b"\0", b" ").strip(), 8)
            size = int(header[124:136].replace(b"\0", b" ").strip() or b"0", 8)
        except ValueError:
            raise ShardError(f"{path}: not a tar header at byte {pos}") from None
        if stored != sum(header) - sum(header[148:156]) + 8 * ord(" "):
            raise ShardError(f"{path}: tar header checksum mismatch at byte {pos} (corrupt shard)")
        name = header[:100].split(b"\0", 1)[0]
        if header[257:262] == b"ustar" and header[345] != 0:
            name = header[345:500].split(b"\0", 1)[0] + b"/" + name
        kind = header[156:157]
        start = pos + TAR_BLOCK
        if start + size > end:
            raise ShardError(f"{path}: truncated: member {name.decode(errors='replace')} ends past the file")
        if kind in (b"0", b"\0"):
            yield name.decode(), data[start:start + size]
        elif kind != b"5":  # directories carry no data; anything else is not ours
            raise ShardError(f"{path}: unsupported tar entry type {kind!r} at byte {pos} "
                             f"({name.decode(errors='replace')})")
        pos = start + size + (-size % TAR_BLOCK)
    raise ShardError(f"{path}: truncated: no end-of-archive block")


def member_at(data, offset: int) -> tuple[str, int]:
    """(name, size) from the ustar header just before the member data at `offset` of a shard's bytes:
    what an index entry claims is checked against the (sha256-verified) tar, not trusted. ('', -1) if
    no header is there."""
    if offset < TAR_BLOCK or offset > len(data):
        return "", -1
    header = bytes(data[offset - TAR_BLOCK:offset])
    try:
        size = int(header[124:136].replace(b"\0", b" ").strip() or b"0", 8)
    except ValueError:
        return "", -1
    return header[:100].split(b"\0", 1)[0].decode(errors="replace"), size


def iter_tar_samples(path: str, data: bytes | None = None):
    """(key, {ext: bytes}) for each sample of a shard, in tar order; ShardError on a bad tar.

    `data`: the shard's bytes where the caller has read them already (compute_pca
    hashes them first)."""
    if data is None:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise ShardError(f"{path}: cannot read ({e.strerror})") from None
    key, sample = None, {}
    for name, member in iter_tar_files(data, path):
        k, _, ext = name.rpartition("/")[2].partition(".")
        if k != key and key is not None:
            yield key, sample
            sample = {}
        key = k
        sample[ext] = member
    if key is not None:
        yield key, sample
