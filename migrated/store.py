"""The receiver's image directory: staging, atomic commit, crash clean-up.

Layout under the receiver's ``--dir``::

    NAME -> .NAME.v<ns>          committed image (a symlink, swapped in one rename)
    .NAME.v<ns>/manifest.json    what the image is
    .NAME.v<ns>/b<N>.mem         one file per block
    .NAME.staging-<token>/       a migration in progress

A reader who opens ``NAME`` sees the previous complete image or the new one,
never a mix. Block files are mapped shared: deltas and fills are applied
through the mapping, and whole pages of a new file are written to it with
``pwritev`` (a first write through a mapping faults every page in and has
the kernel zero-fill it before the copy; that was two thirds of the
receiver's time in pass 0). Either way the pages live in the page cache, so
the receiver's own memory does not grow with the image, unless it is asked
to hold images in memory until the commit (``memory``: one memfd per block,
written to the block file at the commit; the file reserves the space). ``posix_fallocate``
reserves the space first, so a full disk is a clear error rather than a
SIGBUS.
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import json
import mmap
import os
import re
import resource
import secrets
import shutil
import threading
import time
import weakref
from array import array
from pathlib import Path

import structlog

from migrated import __version__
from migrated.errors import LimitReached, NoSpace, RecordError, StoreError
from migrated.pages import hash_marked, image_digest, page_count, zero_page_hash
from migrated.records import Applier, BlockInfo, BlockTarget

log = structlog.get_logger("migrated.store")

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
RESERVED_IN_NAMES = (".staging-", ".link-tmp")  # the store's own entries are named with these
MANIFEST = "manifest.json"
LOCK = ".lock"
BLOCK_BUDGET_MARGIN = 256  # descriptors (and 4x as many mappings) kept for everything but block files
# the store's own entries, ``.NAME`` then one of these; nothing else is ever deleted
_OWN = re.compile(r"\.(?P<name>[A-Za-z0-9][A-Za-z0-9._-]{0,127}?)(?P<kind>\.v\d+|\.staging-[0-9a-f]{1,32}|\.link-tmp)")


def storage_error(exc: OSError, what: str) -> StoreError:
    """The store's error for an OSError: a full disk or quota is NoSpace."""
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return NoSpace(f"{what}: not enough space ({reason})")
    return StoreError(f"{what}: {reason}")


def memory_available() -> int | None:
    """MemAvailable from /proc/meminfo, in bytes (None where it cannot be read)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_name(name: str) -> None:
    if not NAME_RE.fullmatch(name) or any(word in name for word in RESERVED_IN_NAMES):
        raise RecordError(
            f"image name {name[:160]!r} is not valid: 1-128 characters of letters, digits, '.', '_' and '-', "
            "starting with a letter or digit, without '.staging-' or '.link-tmp'",
            0,
        )


def own_entry(entry: str, kind: str, name: str | None = None) -> bool:
    """Whether ``entry`` (a name in the directory) is one the store makes:
    ``kind`` ``v`` (a committed version), ``staging`` or ``link``, of image
    ``name`` (any valid name by default)."""
    found = _OWN.fullmatch(entry)
    if found is None or (name is not None and found["name"] != name):
        return False
    return found["kind"].startswith({"v": ".v", "staging": ".staging-", "link": ".link-tmp"}[kind])


def _real_dir(path: Path) -> bool:
    """A directory itself, not a symlink to one."""
    return path.is_dir() and not path.is_symlink()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ImageStore:
    def __init__(self, root: str | os.PathLike, max_image_size: int | None = None, reserve: float = 0.05):
        self.root = Path(root).absolute()
        self.max_image_size = max_image_size  # bytes of one image's blocks, at most (None: no bound but the disk's)
        self.reserve = reserve  # the share of the filesystem an image may not take
        self.reserving = threading.Lock()  # Staging.set_blocks: check and reserve as one step
        self.stagings: weakref.WeakSet[Staging] = weakref.WeakSet()  # open ones, for the block budget
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".probe-{secrets.token_hex(4)}"
            probe.touch()
            probe.unlink()
        except OSError as exc:
            raise StoreError(f"cannot write to image directory {self.root}: {exc.strerror}") from None
        self._lock = -1

    def open_blocks(self) -> int:
        """Descriptors (and mappings) the open stagings' blocks hold now."""
        return sum(len(st.blocks) * (2 if st.memory else 1) for st in list(self.stagings))

    @staticmethod
    def block_budget() -> int:
        """How many block descriptors and mappings all migrations together
        may hold: the descriptor limit and the kernel's mapping limit, each
        less a margin for everything else the process opens and maps."""
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        budget = soft - BLOCK_BUDGET_MARGIN if soft != resource.RLIM_INFINITY else 1 << 20
        try:
            with open("/proc/sys/vm/max_map_count") as fh:
                budget = min(budget, int(fh.read()) - BLOCK_BUDGET_MARGIN * 4)
        except (OSError, ValueError):
            pass
        return max(budget, 0)

    def lock(self) -> None:
        """Hold the directory for this receiver (an flock on ``.lock``, which
        says whose it is): a second receiver on it would delete this one's
        staging as stale. Idempotent; ``unlock`` lets it go."""
        if self._lock >= 0:
            return
        path = self.root / LOCK
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except OSError as exc:
            raise StoreError(f"cannot open the lock {path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                who = f" (pid {holder})" if holder.isdigit() else ""
                raise StoreError(f"image directory {self.root} is in use by another receiver{who}") from None
            raise StoreError(f"cannot lock {path}: {exc.strerror}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock = fd

    def unlock(self) -> None:
        if self._lock >= 0:
            os.close(self._lock)
            self._lock = -1

    def clean_stale(self) -> list[str]:
        """Remove staging left by a crash and versions no name points to:
        only entries the store names so (``own_entry``), and a symlink only
        where the store's own temporary link was."""
        live = set()
        for entry in self.root.iterdir():
            if entry.is_symlink() and NAME_RE.fullmatch(entry.name):
                live.add(os.readlink(entry))
        removed = []
        for entry in self.root.iterdir():
            n = entry.name
            if own_entry(n, "link"):
                entry.unlink(missing_ok=True)
            elif (own_entry(n, "staging") or (own_entry(n, "v") and n not in live)) and _real_dir(entry):
                shutil.rmtree(entry, ignore_errors=True)
            else:
                continue
            removed.append(n)
        return removed

    def begin(self, name: str, page_size: int, source: str = "", memory: bool = False) -> Staging:
        """A new staging for image ``name``; ``memory``: its pages are held in
        memory and written to the directory once, at the commit."""
        check_name(name)
        target = self.root / name
        if target.exists() and not target.is_symlink():
            raise StoreError(f"{target} exists and is not an image committed by migrated; move it away")
        staging = Staging(self, name, page_size, source, memory)
        self.stagings.add(staging)
        return staging


class _BlockFile:
    """One block's file, its mapping, and the hash of every page as held:
    the applier marks each page it writes, ``rehash`` hashes the marked
    pages (so the digest at commit reads only what the last rounds wrote)."""

    __slots__ = ("info", "path", "fd", "disk", "map", "alloc", "hashes", "marks")

    def __init__(self, info: BlockInfo, path: Path, memory: bool = False):
        self.info = info
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise storage_error(exc, f"cannot create the file of block {info.id!r} in {path.parent}") from None
        # in memory: the pages live in a memfd until the commit writes them to
        # ``path``, which holds the disk space reserved meanwhile
        self.disk = -1
        self.map: mmap.mmap | bytearray | None = None
        self.alloc = 0
        self.hashes = array("Q")
        self.marks = bytearray()
        try:
            if memory:
                self.disk, self.fd = self.fd, os.memfd_create(f"migrated-{path.name}", os.MFD_CLOEXEC)
            self.resize(info)
        except BaseException:
            self.close()  # nothing keeps this block: its descriptors (and the space they hold) go now
            raise

    def resize(self, info: BlockInfo) -> None:
        """Make the file hold ``info.length`` bytes rounded up to a page (the
        wire pads the last page); the common prefix keeps its content."""
        self.unmap()
        ps = info.page_size
        alloc = page_count(info.length, ps) * ps
        for fd, where in ((self.disk, self.path.parent), (self.fd, "memory" if self.disk >= 0 else self.path.parent)):
            if fd < 0:
                continue
            try:
                if alloc < self.alloc:
                    os.ftruncate(fd, alloc)
                elif alloc > self.alloc:
                    os.posix_fallocate(fd, self.alloc, alloc - self.alloc)
            except OSError as exc:
                raise storage_error(exc, f"cannot reserve {alloc} bytes for block {info.id!r} in {where}") from None
        old_pages = len(self.hashes)
        self.alloc = alloc
        self.info = info
        self.map = mmap.mmap(self.fd, alloc) if alloc else bytearray()
        pages = alloc // ps
        # new pages are zeros (posix_fallocate); the old last page may now
        # be read further or less far: hash it again
        if pages < old_pages:
            del self.hashes[pages:], self.marks[pages:]
        else:
            self.hashes.extend(itertools.repeat(zero_page_hash(ps), pages - old_pages))
            self.marks.extend(bytes(pages - old_pages))
        for p in {old_pages - 1, pages - 1}:
            if 0 <= p < pages:
                self.marks[p] = 1

    def rehash(self) -> int:
        """Hash the pages written since the last call; returns how many."""
        if not self.info.length:
            return 0
        assert self.map is not None  # mapped by resize()
        with memoryview(self.map) as mv:
            return hash_marked(mv[: self.info.length], self.marks, self.hashes, self.info.page_size)

    def write_out(self) -> None:
        """For a block held in memory: write it to its file, in order, and
        let the memory go; ``fd`` is the file's from then on."""
        if self.disk < 0:
            return
        self.unmap()
        off = 0
        while off < self.alloc:
            sent = os.sendfile(self.disk, self.fd, off, self.alloc - off)
            if sent <= 0:
                raise OSError(errno.EIO, f"the block held in memory ended at byte {off} of {self.alloc}")
            off += sent
        os.close(self.fd)
        self.fd, self.disk = self.disk, -1

    def unmap(self) -> None:
        if isinstance(self.map, mmap.mmap):
            self.map.close()
        self.map = None

    def close(self) -> None:
        self.unmap()
        for fd in (self.fd, self.disk):
            if fd >= 0:
                os.close(fd)
        self.fd = self.disk = -1


class Staging:
    """An image being received: its directory, one file per block, and the
    ``applier`` that writes page records into them (the ``PageSink`` the
    receiving connection is given). Use ``set_blocks`` for every block list,
    then ``digest`` and ``commit`` (then ``tidy``); ``discard`` on any failure
    (it is idempotent)."""

    def __init__(self, store: ImageStore, name: str, page_size: int, source: str, memory: bool = False):
        self.store = store
        self.memory = memory  # block pages held in memory until the commit
        self.name = name
        self.page_size = page_size
        self.source = source
        self.dir = store.root / f".{name}.staging-{secrets.token_hex(6)}"
        self.committed = False
        try:
            self.dir.mkdir()
        except OSError as exc:
            raise storage_error(exc, f"cannot make the staging directory of image {name!r} in {store.root}") from None
        self.blocks: dict[str, _BlockFile] = {}
        self.order: list[str] = []
        self.applier = Applier(page_size)
        self.applier.allow_xbzrle = False  # until the connection says it was negotiated
        self._files = 0
        self._replaced: Path | None = None  # the committed version this one replaced
        self.sync_seconds = self.swap_seconds = 0.0  # the commit's two parts

    def set_blocks(self, blocks) -> list[BlockTarget]:
        """Follow a block list: resize kept blocks, create new ones, delete
        dropped ones, and point the applier at the new files (a block made
        just now is fresh: all zeros). Returns the applier's targets."""
        self.applier.release()  # its views of the old mappings go before they do
        ids = [b.id for b in blocks]
        if len(set(ids)) != len(ids):
            raise RecordError("block list names a block twice", 0)
        for b in blocks:
            if b.page_size != self.page_size:
                raise RecordError(f"block {b.id!r} has page size {b.page_size}, negotiated {self.page_size}", 0)
        for bid in set(self.blocks) - set(ids):
            f = self.blocks.pop(bid)
            f.close()
            f.path.unlink(missing_ok=True)
        created: set[str] = set()
        # checked and reserved as one step across migrations: two block lists
        # checked at once would both see the same free space (or memory)
        with self.store.reserving:
            self._check_descriptors(blocks)
            self._check_space(blocks)
            if self.memory:
                self._check_memory(blocks)
            for b in blocks:
                kept = self.blocks.get(b.id)
                if kept is None:
                    self._files += 1
                    try:
                        self.blocks[b.id] = _BlockFile(b, self.dir / f"b{self._files}.mem", self.memory)
                    except OSError as exc:  # EMFILE, ENOMEM of a memfd...
                        raise storage_error(exc, f"cannot hold block {b.id!r} of image {self.name!r}") from None
                    created.add(b.id)
                elif kept.info.length != b.length or kept.map is None:
                    kept.resize(b)
                else:
                    kept.info = b
        self.order = ids
        # a block file made just now is all zeros: the applier may skip zero
        # fills, and writes its whole pages to the file rather than the map
        targets = [
            BlockTarget(bid.encode(), f.map, bid in created, f.fd, f.marks)
            for bid, f in ((b, self.blocks[b]) for b in ids)
        ]
        self.applier.set_blocks(targets)
        return targets

    def _check_descriptors(self, blocks) -> None:
        """Refuse a block list whose new blocks would take the receiver past
        its budget of descriptors and mappings (each block holds a file
        descriptor and a mapping, a memfd too when held in memory): its
        other migrations, and the process, keep theirs."""
        new = sum(1 for b in blocks if b.id not in self.blocks)
        need = new * (2 if self.memory else 1)
        budget = self.store.block_budget()
        in_use = self.store.open_blocks()
        if need and in_use + need > budget:
            raise LimitReached(
                f"image {self.name!r} declares {len(blocks)} blocks: the receiver can hold {budget} block files "
                f"and mappings at once ({in_use} in use; each block takes a descriptor and a mapping; "
                "raise the descriptor limit, LimitNOFILE=, to hold more)"
            )

    def _check_space(self, blocks) -> None:
        """Refuse a block list before anything is reserved: larger than
        --max-image-size (``limit``), or needing more of the disk than is free
        beyond the reserve (``no-space``)."""
        total = sum(page_count(b.length, b.page_size) * b.page_size for b in blocks)
        limit = self.store.max_image_size
        if limit is not None and total > limit:
            raise LimitReached(
                f"image {self.name!r} declares {total} bytes of blocks, more than the receiver's "
                f"--max-image-size of {limit}"
            )
        more = sum(max(0, page_count(b.length, b.page_size) * b.page_size - self._held(b.id)) for b in blocks)
        if not more:
            return
        try:
            st = os.statvfs(self.dir)
        except OSError:
            return  # posix_fallocate still says no-space clearly
        free = st.f_bavail * st.f_frsize - int(self.store.reserve * st.f_blocks * st.f_frsize)
        if more > free:
            raise NoSpace(
                f"cannot receive image {self.name!r}: its blocks need {more} more bytes and {max(free, 0)} are "
                f"free in {self.store.root} beyond the {self.store.reserve:.0%} of it kept in reserve (--reserve)"
            )

    def _check_memory(self, blocks) -> None:
        """Refuse a block list whose new memory would not fit in what the
        machine has available (the kernel would answer with its OOM killer)."""
        more = sum(max(0, page_count(b.length, b.page_size) * b.page_size - self._held(b.id)) for b in blocks)
        available = memory_available()
        if more and available is not None and more > available:
            raise NoSpace(
                f"cannot hold image {self.name!r} in memory (--stage-in-memory): its blocks need {more} more "
                f"bytes and {available} are available; receive it to disk, or free memory"
            )

    def _held(self, bid: str) -> int:
        f = self.blocks.get(bid)
        return f.alloc if f is not None else 0

    def end_of_fresh_blocks(self) -> None:
        """The pass that sent the new blocks whole has ended: from now on
        every zero fill is written."""
        self.applier.clear_fresh()

    def rehash(self) -> int:
        """Between passes: hash the pages written since the last call, so
        that the digest at commit reads only what the last pass wrote.
        Returns how many pages were hashed."""
        return sum(f.rehash() for f in list(self.blocks.values()))

    def flush(self) -> None:
        """Between passes: write the pages held to disk (fdatasync covers
        pages written through the mapping), so that the commit has little
        left to sync. Runs while the next pass is being applied, but never
        while the block list changes."""
        for f in list(self.blocks.values()):
            if f.fd >= 0 and f.disk < 0:  # a block held in memory goes to disk at the commit
                os.fdatasync(f.fd)

    def digest(self) -> str:
        """Digest of the pages held, computed as the sender computes it: each
        page's hash as read back from its file, hashed again if written since."""
        for f in self.blocks.values():
            f.rehash()
        return image_digest((bid, self.blocks[bid].info.length, self.blocks[bid].hashes) for bid in self.order)

    def _write_durably(self, digest: str, source_info: dict | None) -> None:
        """The block files (written out from memory first, where held there)
        and the manifest, on disk and synced, in the staging directory."""
        blocks = []
        for bid in self.order:
            f = self.blocks[bid]
            f.write_out()
            f.unmap()
            os.ftruncate(f.fd, f.info.length)
            os.fsync(f.fd)  # covers pages written through the mapping too
            blocks.append(
                # what the sender says of the block stays under its own key
                {
                    "id": bid,
                    "length": f.info.length,
                    "page_size": f.info.page_size,
                    "file": f.path.name,
                    "info": f.info.info,
                }
            )
        manifest = {
            "name": self.name,
            "source": self.source,
            "source_info": source_info or {},
            "blocks": blocks,
            "digest": digest,
            "completed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "migrated_version": __version__,
        }
        mpath = self.dir / MANIFEST
        with open(mpath, "w") as fh:
            json.dump(manifest, fh, indent=2)
            fh.flush()
            os.fsync(fh.fileno())
        for f in self.blocks.values():
            f.close()
        _fsync_dir(self.dir)

    def commit(self, digest: str, source_info: dict | None = None) -> Path:
        """Make this the committed image of its name, atomically and durably."""
        started = time.monotonic()
        self.applier.release()
        try:
            self._write_durably(digest, source_info)
        except OSError as exc:  # a full disk at the manifest, EIO writing a block held in memory...
            raise storage_error(exc, f"cannot commit image {self.name!r} in {self.store.root}") from None
        synced = time.monotonic()
        self.sync_seconds = synced - started
        root = self.store.root
        version = f".{self.name}.v{time.time_ns()}"
        link = root / self.name
        previous = os.readlink(link) if link.is_symlink() else None
        tmp = root / f".{self.name}.link-tmp"
        try:
            os.rename(self.dir, root / version)
            self.dir = root / version  # what discard() removes if the swap fails
            tmp.unlink(missing_ok=True)
            os.symlink(version, tmp)
            os.rename(tmp, link)
        except OSError as exc:  # a full directory (no inode for the link)...: the previous image stays
            tmp.unlink(missing_ok=True)
            raise storage_error(exc, f"cannot swap in image {self.name!r} in {root}") from None
        self.committed = True
        try:
            _fsync_dir(root)
        except OSError as exc:  # swapped in, but not known durable
            log.warning("sync_directory", path=str(root), error=exc.strerror or str(exc))
        self.swap_seconds = time.monotonic() - synced
        self.blocks.clear()
        # only a version of this image the store made, never what a planted link names
        replaced = root / previous if previous and previous != version and own_entry(previous, "v", self.name) else None
        self._replaced = replaced if replaced is not None and _real_dir(replaced) else None
        return link

    def tidy(self) -> None:
        """After a commit, off the sender's downtime: leave the image's page
        cache to whoever reads it (it is on disk), and remove the version it
        replaced (deleting a large file takes tens of milliseconds)."""
        for entry in self.dir.glob("*.mem"):
            try:
                fd = os.open(entry, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:  # replaced by a newer commit meanwhile
                continue
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        if self._replaced is not None and _real_dir(self._replaced):
            shutil.rmtree(self._replaced, ignore_errors=True)
            self._replaced = None

    def discard(self) -> None:
        """Drop everything this staging holds: its staging directory, or the
        version a failed swap left (never a committed image)."""
        self.applier.release()
        for f in self.blocks.values():
            f.close()
        self.blocks.clear()
        kind = "v" if self.dir.name.startswith(f".{self.name}.v") else "staging"
        if not self.committed and own_entry(self.dir.name, kind, self.name) and _real_dir(self.dir):
            shutil.rmtree(self.dir, ignore_errors=True)
