"""The on-disk cache ($ATTNOPT_CACHE_DIR, else ~/.cache/attnopt: one per user) and its trust model.

Why a trust model: the cache holds code that attnopt runs in-process, under names anyone can predict
(the compiled CPU tile kernel, a .so that is dlopen-ed; the generated Triton modules). Whoever can
write there would run code in every attnopt process. So an entry is used only when
  - every directory from the cache root down to it, and the file itself, belong to this user and are
    writable by no one else (directories attnopt creates are 0o700, files 0o600, libraries 0o700);
  - a built artifact's SHA-256 equals the one recorded beside it (`<file>.sha256`) when it was built
    (generated sources need no record: the caller compares the bytes with the text it rendered).
Anything else is rebuilt over the entry; where the cache cannot be trusted or written, a library is
built in a fresh private directory (mkdtemp) and removed once loaded, and generated source stays in
memory. The record catches a corrupt, truncated, swapped or planted file; it cannot catch a writer
who is this same user (nothing stored beside the file can). Tune results are data: read with a size
cap and validated by their readers; a bad one is a miss.

Cache faults never fail a run: a cache path that is a file, a read-only cache, an unwritable HOME
only mean that nothing is remembered (one warning line per process says why). Every write goes to a
temporary file in the target directory and is renamed over the entry: a reader sees all or nothing.

The lowest layer: imports nothing from attnopt, and no torch.
"""
from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import logging
import os
import shutil
import stat
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger("attnopt.cache")

HASH_SUFFIX = ".sha256"
MAX_DATA_BYTES = 1 << 20  # a tune entry is a few hundred bytes; anything near this is not ours

_WARN_LOCK = threading.Lock()
_WARNED = False
_PRIVATE_LOCK = threading.Lock()
_PRIVATE: set[Path] = set()
_CLEANUP_PID: int | None = None


def warn_once(message: str) -> None:
    """One warning line per process about the cache (later ones go to the debug log): a cache that
    cannot be used would otherwise repeat it for every kernel."""
    global _WARNED
    with _WARN_LOCK:
        first, _WARNED = not _WARNED, True
    (log.warning if first else log.debug)("%s", message)


def _uid() -> int | None:
    return os.geteuid() if hasattr(os, "geteuid") else None


def cache_root() -> Path:
    """$ATTNOPT_CACHE_DIR, else ~/.cache/attnopt; without a known home, a per-user directory in the
    temp dir (which the ownership check refuses if someone else made it first)."""
    root = os.environ.get("ATTNOPT_CACHE_DIR")
    if root:
        return Path(root)
    try:
        return Path.home() / ".cache" / "attnopt"
    except (RuntimeError, KeyError, OSError):  # no $HOME and no passwd entry
        return Path(tempfile.gettempdir()) / f"attnopt-{_uid()}"


def _untrusted(st: os.stat_result) -> str | None:
    """Why a file or directory with this stat cannot be trusted, or None."""
    uid = _uid()
    if uid is not None and st.st_uid != uid:
        return f"owned by uid {st.st_uid}, not this user ({uid})"
    if st.st_mode & 0o022:
        return f"writable by group or others (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def _dir_refusal(st: os.stat_result) -> str | None:
    return "not a directory" if not stat.S_ISDIR(st.st_mode) else _untrusted(st)


def directory(*parts: str) -> Path | None:
    """The cache directory root/parts, created (0o700) where missing, when every directory from the
    root down is this user's and writable by no one else; None (with the warning) when it cannot
    be made or trusted. A symlinked root is followed (the user chose it); links below it are not."""
    path = cache_root()
    try:
        with contextlib.suppress(FileExistsError):  # a file there: "not a directory" below
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
        why = _dir_refusal(os.stat(path))
        for part in parts:
            if why:
                break
            path = path / part
            with contextlib.suppress(FileExistsError):
                path.mkdir(mode=0o700, exist_ok=True)
            why = _dir_refusal(os.lstat(path))
    except OSError as e:
        why = f"{type(e).__name__}: {e.strerror or e}"
    if why:
        warn_once(f"attnopt: not using the cache directory {path} ({why}); kernels are built in a "
                  "private directory for this process and nothing is remembered")
        return None
    return path


def _private_dir() -> Path:
    """A fresh directory of this process alone (mkdtemp: 0o700, unpredictable name), for an artifact
    the cache cannot hold; the caller removes it once loaded (discard_private), exit removes the
    rest. Raises OSError when the temp dir is not writable either."""
    global _CLEANUP_PID
    d = Path(tempfile.mkdtemp(prefix="attnopt-private-"))
    with _PRIVATE_LOCK:
        if _CLEANUP_PID != os.getpid():
            _CLEANUP_PID = os.getpid()
            atexit.register(_remove_private, _CLEANUP_PID)
        _PRIVATE.add(d)
    return d


def discard_private(path: Path) -> None:
    """Remove the private directory that build_artifact put `path` in, once the caller has loaded it
    (a mapped library outlives its file): a CLI leaves by os._exit, past any atexit handler."""
    with _PRIVATE_LOCK:
        if Path(path).parent not in _PRIVATE:
            return
        _PRIVATE.discard(Path(path).parent)
    shutil.rmtree(Path(path).parent, ignore_errors=True)


def _remove_private(pid: int) -> None:
    if os.getpid() == pid:  # not a forked child's copy of the handler
        for d in list(_PRIVATE):
            shutil.rmtree(d, ignore_errors=True)


def atomic_write(path: Path, data: str | bytes, mode: int = 0o600) -> None:
    """Write `data` to `path` through a temporary file in the same directory and a rename (a reader
    sees the old file or the new one, whole); creates missing directories (0o700). Raises OSError."""
    path = Path(path)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # 0o600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        if mode != 0o600:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def store(path: Path, data: str | bytes) -> bool:
    """atomic_write for what is only worth remembering (tune results, the CPU profile): False instead
    of an error when it cannot be written."""
    try:
        atomic_write(path, data)
        return True
    except OSError as e:
        warn_once(f"attnopt: could not write {path} ({type(e).__name__}: {e.strerror or e}); "
                  "it is measured again next time")
        return False


def _read_entry(path: Path, limit: int) -> bytes | None:
    """The bytes of a cache entry that may be used (a regular file of this user, writable by no one
    else, at most `limit` bytes), else None. Opened without blocking: a FIFO planted there is refused,
    not waited on."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        return None
    except OSError as e:
        warn_once(f"attnopt: not using the cache entry {path} ({type(e).__name__}: {e.strerror or e})")
        return None
    try:
        st = os.fstat(fd)
        why = "not a regular file" if not stat.S_ISREG(st.st_mode) else _untrusted(st)
        if why is None and st.st_size > limit:
            why = f"{st.st_size} bytes, more than {limit}"
        if why is None:
            chunks, size = [], 0
            while size <= limit:
                chunk = os.read(fd, limit + 1 - size)
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
            if size <= limit:
                return b"".join(chunks)
            why = f"more than {limit} bytes"
    except OSError as e:
        why = f"{type(e).__name__}: {e.strerror or e}"
    finally:
        os.close(fd)
    warn_once(f"attnopt: not using the cache entry {path} ({why})")
    return None


def read_json(path: Path, limit: int = MAX_DATA_BYTES) -> Any | None:
    """The JSON value stored at `path`, or None for anything else: missing, not a file, not ours,
    unreadable, over `limit` bytes, not UTF-8, invalid or absurdly nested JSON. The caller still
    validates the value's types: it is data from disk."""
    data = _read_entry(path, limit)
    if data is None:
        return None
    try:
        return json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError, MemoryError):  # UnicodeDecodeError is a ValueError
        return None


def file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _refusal(path: Path) -> str | None:
    """Why the built artifact at `path` may not be used, or None. Raises FileNotFoundError when
    there is none."""
    st = os.lstat(path)
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    why = _untrusted(st)
    if why:
        return why
    record = _read_entry(path.with_name(path.name + HASH_SUFFIX), 256)
    recorded = record.decode("ascii", "replace").strip() if record is not None else ""
    if len(recorded) != 64:
        return "no valid recorded hash"
    if file_hash(path) != recorded:
        return "its SHA-256 differs from the one recorded when it was built"
    return None


def cached_artifact(subdir: str, name: str) -> Path | None:
    """The built artifact subdir/name of the cache when it may be used (see the module doc), else
    None: build it with build_artifact."""
    d = directory(subdir)
    if d is None:
        return None
    path = d / name
    try:
        why = _refusal(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        why = f"{type(e).__name__}: {e.strerror or e}"
    if why is None:
        return path
    warn_once(f"attnopt: not using the cached {path} ({why}); it is rebuilt")
    return None


def build_artifact(subdir: str, name: str, make: Callable[[Path], None], mode: int = 0o700) -> Path:
    """Build an artifact with `make(tmp)` (writes the file at tmp, or raises: that propagates), then
    rename it to subdir/name of the cache, replacing whatever was there, and record its hash; where
    the cache cannot be used or written, into a private directory of this process instead (the caller
    calls discard_private after loading it). Returns the path to load. Raises OSError when not even a
    private directory can be written."""
    cached = directory(subdir)
    error: OSError | None = None
    for d in ([cached] if cached is not None else []) + [None]:
        try:
            d = d if d is not None else _private_dir()
            fd, tmp_name = tempfile.mkstemp(dir=d, prefix=f".{name}.", suffix=".tmp")
            os.close(fd)
        except OSError as e:
            error = e
            warn_once(f"attnopt: cannot write in {d or 'a private directory'} ({type(e).__name__}: "
                      f"{e.strerror or e}); kernels are built in a private directory for this process")
            continue
        tmp = Path(tmp_name)
        try:
            make(tmp)
            os.chmod(tmp, mode)
            digest = file_hash(tmp)
            final = d / name
            os.replace(tmp, final)
        except BaseException as e:
            with contextlib.suppress(OSError):
                tmp.unlink()
            if not isinstance(e, OSError) or d != cached:
                raise
            error = e
            warn_once(f"attnopt: cannot write {d / name} ({type(e).__name__}: {e.strerror or e}); "
                      "kernels are built in a private directory for this process")
            continue
        # Without its record the file is still the one just built, so it is used now; the next
        # process finds no record and rebuilds.
        store(final.with_name(name + HASH_SUFFIX), digest + "\n")
        return final
    raise OSError(f"no writable directory to build {name} in: {error}")


def generated_file(subdir: str, name: str, text: str) -> Path | None:
    """The cache file subdir/name, holding exactly `text` (generated source: the text is its own
    check): the file as it is when it may be used and holds `text` already, else `text` written over
    it; None when the cache cannot hold it. Callers run `text` itself, never the file: it is there
    for tracebacks, source inspection and the reader."""
    data = text.encode()
    d = directory(subdir)
    if d is None:
        return None
    held = _read_entry(d / name, len(data))
    if held == data:
        return d / name
    if held is not None:
        warn_once(f"attnopt: {d / name} does not hold the source attnopt renders; it is rewritten")
    try:
        atomic_write(d / name, data)
        return d / name
    except OSError as e:
        warn_once(f"attnopt: cannot write {d / name} ({type(e).__name__}: {e.strerror or e}); the "
                  "generated source is kept in memory")
        return None
