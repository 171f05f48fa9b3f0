"""The cache's trust model (attnopt.util.cache): code planted in the cache under the exact names the
loaders use never runs, and a cache that is broken, read-only, misplaced or hostile never fails a
run (API and CLI), it only costs a rebuild.

Hostile inputs are made at run time: a C library whose constructor writes a marker file (built with
the system compiler), a Python module that writes one on import, corrupt libraries, tune entries that
are directories or absurdly nested JSON. Tests run as root, where permission bits do not stop writes:
a read-only cache is emulated by os functions that fail with EROFS under it, and a chmod 0o500
variant runs only for other users.
"""
from __future__ import annotations

import ast
import errno
import hashlib
import importlib.util
import linecache
import logging
import os
import py_compile
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from zoo.testing import run_cli

from attnopt.codegen import autotune
from attnopt.codegen.cpu import tiles as cpu
from attnopt.codegen.cpu import native as cpu_native
from attnopt.codegen.params import AttentionParams
from attnopt.cost import hardware
from attnopt.sparsity.gna import dense_mask
from attnopt.ir import GNALayout
from attnopt.util import cache

CC = shutil.which(os.environ.get("CC") or "cc")
needs_cc = pytest.mark.skipif(CC is None, reason="no C compiler: nothing is built or planted")
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


_BUILT: dict[tuple, bytes] = {}


@pytest.fixture(autouse=True)
def compile_once(monkeypatch):
    """These tests are about what the loader trusts, not about the compiler: the first build of
    each (compiler, flags) in this process is real, later ones write the same bytes to the path the
    loader asked for (~10 s of C compile per test otherwise, two dozen tests)."""
    real = cpu_native._compile

    def once(cc, flags, out):
        key = (cc, tuple(flags), cpu_native.SOURCE.stat().st_mtime_ns)
        if key not in _BUILT:
            real(cc, flags, out)
            _BUILT[key] = Path(out).read_bytes()
        else:
            Path(out).write_bytes(_BUILT[key])

    monkeypatch.setattr(cpu_native, "_compile", once)


@pytest.fixture
def root(monkeypatch, tmp_path):
    """A private cache root, a forgotten native library and tune memory, and a fresh warning budget."""
    d = tmp_path / "cache"
    monkeypatch.setenv("ATTNOPT_CACHE_DIR", str(d))
    monkeypatch.setattr(cache, "_WARNED", False)
    monkeypatch.setattr(cpu, "_TUNED", {})
    cpu_native._library.cache_clear()
    yield d
    cpu_native._library.cache_clear()


def _marker_library(tmp_path: Path, marker: Path) -> Path:
    """A shared library whose constructor writes `marker` when it is loaded."""
    src = tmp_path / "planted.c"
    src.write_text('#include <stdio.h>\n'
                   '__attribute__((constructor)) static void planted(void) {\n'
                   f'  FILE *f = fopen("{marker}", "w"); if (f) {{ fputs("ran", f); fclose(f); }}\n'
                   '}\n'
                   'int attnopt_tiles_parallel(void) { return 0; }\n')
    lib = tmp_path / "planted.so"
    subprocess.run([CC, "-shared", "-fPIC", "-o", str(lib), str(src)], check=True, capture_output=True)
    return lib


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _plant_library(root: Path, payload: Path | bytes, record: str = "right") -> list[Path]:
    """`payload` at every name the native loader tries, with a hash record: "right" (the payload's
    own: what a planter who could also write the record would leave), "wrong", or "none"."""
    d = cache.directory("native")
    data = payload.read_bytes() if isinstance(payload, Path) else payload
    planted = []
    for _, name in cpu_native.library_names(CC):
        p = d / name
        p.write_bytes(data)
        p.chmod(0o700)
        if record != "none":
            digest = hashlib.sha256(data).hexdigest() if record == "right" else "0" * 64
            (d / (name + cache.HASH_SUFFIX)).write_text(digest + "\n")
        planted.append(p)
    return planted


def _native_is_exact():
    """The compiled kernel runs and matches the masked SDPA it replaces."""
    layout = GNALayout((12, 12), (5, 5))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 144, 16, generator=g) for _ in range(3))
    p = AttentionParams(scale=0.25)
    assert cpu.native_runs(q, k, v, None, p)
    out = cpu.gna_attention(q, k, v, layout, p, q_tile=(4, 4))
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=torch.from_numpy(dense_mask(layout)), scale=0.25)
    assert (out - ref).abs().max().item() < 1e-5


def _loaded_path() -> Path:
    return Path(cpu_native._library()._name)


def _cache_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "attnopt.cache" and r.levelno >= logging.WARNING]


# ---- planted and corrupt native libraries -------------------------------------------------

@needs_cc
@pytest.mark.parametrize("how", ["no_record", "wrong_record", "symlink", "group_writable_file",
                                 "world_writable_dir", "foreign_file"])
def test_planted_library_never_loads(root, tmp_path, caplog, how):
    marker = tmp_path / "marker"
    evil = _marker_library(tmp_path, marker)
    # "right" record: only the file's owner, mode or kind, or its directory, gives it away
    planted = _plant_library(root, evil, {"no_record": "none", "wrong_record": "wrong"}.get(how, "right"))
    if how == "symlink":
        for p in planted:
            p.unlink()
            p.symlink_to(evil)
    elif how == "group_writable_file":
        for p in planted:
            p.chmod(0o720)
    elif how == "world_writable_dir":
        (root / "native").chmod(0o777)
    elif how == "foreign_file":
        if not IS_ROOT:
            pytest.skip("giving a file to another user needs root")
        for p in planted:
            os.chown(p, 65534, 65534)
    with caplog.at_level(logging.WARNING):
        assert cpu_native.available()
        _native_is_exact()
    assert not marker.exists(), "the planted library was loaded"
    assert len(_cache_warnings(caplog)) == 1
    loaded = _loaded_path()
    if how == "world_writable_dir":  # nothing in an untrusted directory is used or replaced
        assert all(p.read_bytes() == evil.read_bytes() for p in planted)
        assert loaded.parent != root / "native" and not loaded.parent.exists()  # private, gone once loaded
    else:  # rebuilt over the planted file, with its own record: the next process loads it
        assert loaded.parent == root / "native" and loaded.read_bytes() != evil.read_bytes()
        assert (root / "native" / (loaded.name + ".sha256")).read_text().strip() == _sha(loaded)
        if how != "foreign_file":
            stamp = loaded.stat().st_mtime_ns
            cpu_native._library.cache_clear()
            assert cpu_native.available() and _loaded_path() == loaded and loaded.stat().st_mtime_ns == stamp
    assert not marker.exists()


@needs_cc
@pytest.mark.parametrize("how", ["garbage_with_right_record", "truncated_build"])
def test_corrupt_library_is_rebuilt(root, monkeypatch, tmp_path, how):
    if how == "truncated_build":
        # a build cut short after its record was written, in a second cache (a library this
        # process has mapped must not be cut under it: that is a SIGBUS, not a cache fault)
        assert cpu_native.available()
        lib = _loaded_path()
        data, record = lib.read_bytes(), lib.with_name(lib.name + ".sha256").read_text()
        root = tmp_path / "second"
        monkeypatch.setenv("ATTNOPT_CACHE_DIR", str(root))
        cpu_native._library.cache_clear()
        for p in _plant_library(root, data[: len(data) // 2], "none"):
            p.with_name(p.name + ".sha256").write_text(record)
    else:  # passes the hash check, fails dlopen: rebuilt, not skipped forever
        _plant_library(root, os.urandom(4096), "right")
    assert cpu_native.available()
    _native_is_exact()
    lib = _loaded_path()
    assert lib.parent == root / "native"
    assert (root / "native" / (lib.name + ".sha256")).read_text().strip() == _sha(lib)


@needs_cc
def test_build_records_its_hash_with_private_modes(root):
    assert cpu_native.available()
    lib = _loaded_path()
    assert lib.parent == root / "native"
    for d in (root, root / "native"):
        assert d.stat().st_mode & 0o777 == 0o700
    assert not lib.stat().st_mode & 0o077
    record = lib.with_name(lib.name + ".sha256")
    assert record.read_text().strip() == _sha(lib) and not record.stat().st_mode & 0o077
    assert not [p for p in (root / "native").iterdir() if p.name.startswith(".")]  # no temporaries


# ---- planted Triton module ----------------------------------------------------------------

@pytest.mark.parametrize("where", ["cache", "world_writable_dir"])
def test_planted_triton_module_never_runs(root, tmp_path, monkeypatch, caplog, where):
    tk = pytest.importorskip("attnopt.codegen.triton")
    from attnopt.codegen.triton import generator, template

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(generator, "_MODULES", {})
    marker = tmp_path / "marker"
    stem = f"causal_dense_{template.template_hash()}"
    planted = cache.directory("triton") / f"{stem}.py"
    evil = f"open({str(marker)!r}, 'w').write('ran')\ndef causal_fwd_kernel(*a, **k):\n    pass\n"
    planted.write_text(evil)
    # and a bytecode cache for it, as a planter would leave it (SourceFileLoader would prefer it)
    py_compile.compile(str(planted), cfile=importlib.util.cache_from_source(str(planted)))
    if where == "world_writable_dir":
        planted.parent.chmod(0o777)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 33, 16, generator=g) for _ in range(3))
    with caplog.at_level(logging.WARNING):
        out = tk.launch("causal", q, k, v, None, AttentionParams(scale=0.25, causal=True))
    assert not marker.exists(), "the planted module ran"
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.25)
    assert out is not None and (out - ref).abs().max().item() < 2e-5
    assert len(_cache_warnings(caplog)) == 1
    rendered = template.render("causal", "dense")
    if where == "cache":  # rewritten with the rendered text
        assert planted.read_text() == rendered
    else:  # left alone: the module runs from memory (tracebacks and triton read it via linecache)
        assert planted.read_text() == evil
        name = generator._MODULES[("causal", "dense", True)].__file__
        assert not Path(name).exists() and "".join(linecache.getlines(name)) == rendered


# ---- tune entries -------------------------------------------------------------------------

@pytest.mark.parametrize("entry", ["directory", "nested", "huge", "fifo", "wrong_types", "float_tile",
                                   "not_utf8", "foreign"])
def test_bad_tune_entry_is_a_miss(root, entry):
    key, cands = {"kernel": "test"}, [(8,), (16,)]
    path = cache.directory("sub") / f"tune-{autotune.key_hash(key)}.json"
    if entry == "directory":
        path.mkdir()
    elif entry == "nested":
        path.write_text('{"config": ' + "[" * 200_000 + "]" * 200_000 + "}")
    elif entry == "huge":
        path.write_text('{"config": [16], "pad": "' + "x" * (2 << 20) + '"}')
    elif entry == "fifo":
        os.mkfifo(path)  # a reader that waited for a writer would hang here
    elif entry == "wrong_types":
        path.write_text('{"config": {"q_tile": [16]}}')
    elif entry == "float_tile":
        path.write_text('{"config": [16.0]}')  # equal to (16,), but a float is no tile
    elif entry == "not_utf8":
        path.write_bytes(b'{"config": [16], "x": "\xff\xfe"}')
    elif entry == "foreign":
        if not IS_ROOT:
            pytest.skip("giving a file to another user needs root")
        path.write_text('{"config": [16]}')
        os.chown(path, 65534, 65534)
    timed = []
    best = autotune.fastest(key, cands, lambda c: timed.append(c) or (0.1 if c == (8,) else 1.0), subdir="sub",
                            encode=list, decode=tuple, memo={})
    if entry == "float_tile":
        assert best == (16,) and type(best[0]) is int and not timed  # the candidate itself
    else:
        assert best == (8,) and timed == cands  # measured again


def test_tune_entry_in_group_writable_directory_is_not_used(root):
    key, cands = {"kernel": "test"}, [(8,), (16,)]
    d = cache.directory("sub")
    (d / f"tune-{autotune.key_hash(key)}.json").write_text('{"config": [16]}')
    memo: dict = {}
    assert autotune.fastest(key, cands, lambda c: 1.0, subdir="sub", encode=list, decode=tuple, memo=memo) == (16,)
    d.chmod(0o770)
    assert autotune.fastest(key, cands, lambda c: 0.1 if c == (8,) else 1.0, subdir="sub", encode=list,
                            decode=tuple, memo={}) == (8,)


def test_foreign_cache_directory_is_not_used(root, monkeypatch):
    """Every directory down from the root must be this user's: here none is."""
    key, cands = {"kernel": "test"}, [(8,), (16,)]
    cache.directory("sub")
    (root / "sub" / f"tune-{autotune.key_hash(key)}.json").write_text('{"config": [16]}')
    monkeypatch.setattr(cache, "_uid", lambda: 12345)
    assert cache.directory("sub") is None
    assert autotune.fastest(key, cands, lambda c: 0.1 if c == (8,) else 1.0, subdir="sub", encode=list,
                            decode=tuple, memo={}) == (8,)


# ---- caches that cannot be used: every run still succeeds ---------------------------------

def _read_only(monkeypatch, under: Path) -> None:
    """Make `under` behave as a read-only file system (EROFS) for this process, root included."""
    under = str(under)

    def inside(p) -> bool:
        return os.path.abspath(os.fsdecode(p)).startswith(under)

    def refuse(p):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(p))

    def guard(fn, write=lambda *a, **k: True):
        def guarded(p, *a, **k):
            if isinstance(p, (str, bytes, os.PathLike)) and inside(p) and write(*a, **k):
                refuse(p)
            return fn(p, *a, **k)
        return guarded

    writes = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    monkeypatch.setattr(os, "open", guard(os.open, lambda flags, *a, **k: flags & writes))
    for name in ("mkdir", "unlink", "chmod", "rmdir"):
        monkeypatch.setattr(os, name, guard(getattr(os, name)))
    for name in ("replace", "rename"):
        monkeypatch.setattr(os, name, guard(getattr(os, name)))


def _break_cache(how: str, root: Path, tmp_path: Path, monkeypatch) -> None:
    """Make the cache at `root` unusable (or poisoned) in the way `how` names."""
    if how == "file":
        root.parent.mkdir(parents=True, exist_ok=True)
        root.write_text("not a directory\n")
    elif how == "read_only":
        cache.directory()
        _read_only(monkeypatch, root)
    elif how == "read_only_chmod":
        if IS_ROOT:
            pytest.skip("root writes to 0o500 directories (the EROFS variant covers it)")
        cache.directory()
        root.chmod(0o500)
    elif how == "unwritable_home":
        home = tmp_path / "home"
        home.write_text("a file where HOME should be\n")
        monkeypatch.delenv("ATTNOPT_CACHE_DIR")
        monkeypatch.setenv("HOME", str(home))
    elif how == "group_writable":
        cache.directory()
        root.chmod(0o775)
    elif how in ("tune_directory", "tune_nested"):
        # every tune key lands on the one planted entry
        monkeypatch.setattr(autotune, "key_hash", lambda key: "planted")
        for sub in ("cpu", "triton"):
            path = cache.directory(sub) / "tune-planted.json"
            if how == "tune_directory":
                path.mkdir()
            else:
                path.write_text("[" * 100_000 + "]" * 100_000)
    elif how == "corrupt_library":
        if CC is None:
            pytest.skip("no C compiler")
        _plant_library(root, os.urandom(4096), "right")
    elif how == "corrupt_profile":
        cache.directory()
        (root / "cpu_profile.json").write_text('{"fp32_flops": 1e400, "mem_bw": "x", "exp_per_s": [], "cores": 0}')


BROKEN = ["file", "read_only", "read_only_chmod", "unwritable_home", "group_writable", "tune_directory",
          "tune_nested", "corrupt_library", "corrupt_profile"]


@pytest.fixture
def tuning(monkeypatch):
    """CPU kernels tune even tiny inputs, so each run reads and writes tune entries."""
    monkeypatch.setattr(cpu, "TUNE_MIN_ELEMS", 0)
    monkeypatch.setenv("ATTNOPT_AUTOTUNE", "1")


@pytest.mark.parametrize("how", BROKEN)
def test_broken_cache_api_still_runs(root, tmp_path, monkeypatch, caplog, tuning, how):
    _break_cache(how, root, tmp_path, monkeypatch)
    layout = GNALayout((12, 12), (5, 5))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 144, 16, generator=g) for _ in range(3))
    p = AttentionParams(scale=0.25)
    with caplog.at_level(logging.WARNING):
        out = cpu.gna_attention(q, k, v, layout, p)  # tuned, through the native kernel where it builds
        prof = hardware.cpu_profile()
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=torch.from_numpy(dense_mask(layout)), scale=0.25)
    assert (out - ref).abs().max().item() < 1e-5
    assert prof.peak_flops["fp32"] > 0 and prof.num_sms >= 1
    if CC is not None:
        assert cpu_native.available()  # built privately where the cache cannot hold it
    assert len(_cache_warnings(caplog)) <= 1


@pytest.fixture
def window_model(tmp_path):
    """A small exported sliding-window attention: its rewrite runs the native window kernel."""
    class Window(torch.nn.Module):
        def forward(self, q, k, v):
            i, j = torch.arange(q.shape[2])[:, None], torch.arange(q.shape[2])[None, :]
            s = (q @ k.transpose(-1, -2)) * 0.25
            s = s.masked_fill(~((j <= i) & (i - j < 8)), float("-inf"))
            return torch.softmax(s, dim=-1) @ v

    g = torch.Generator().manual_seed(0)
    x = tuple(torch.randn(1, 2, 96, 16, generator=g) for _ in range(3))
    path = tmp_path / "window.pt2"
    torch.export.save(torch.export.export(Window(), x), path)
    return path


@pytest.mark.parametrize("how", ["file", "read_only", "unwritable_home", "tune_directory", "tune_nested",
                                 "corrupt_library"])
def test_broken_cache_cli_optimize_exits_0(root, tmp_path, monkeypatch, tuning, window_model, how):
    _break_cache(how, root, tmp_path, monkeypatch)
    out = tmp_path / "o.pt2"
    rc, stdout, err = run_cli("optimize", window_model, "-o", out, "--json")
    assert rc == 0, err
    assert '"sites_rewritten": 1' in stdout and out.exists()


def test_cache_file_cli_plan_exits_0(root, tmp_path, monkeypatch, window_model):
    """`attnopt plan` measures the CPU profile and would store it: a cache that is a file is no error."""
    _break_cache("file", root, tmp_path, monkeypatch)
    rc, _, err = run_cli("plan", window_model, "-o", tmp_path / "plan.json", "--target", "cpu")
    assert rc == 0, err
    assert (tmp_path / "plan.json").exists()


def test_window_model_uses_the_cache(root, tuning, window_model, tmp_path):
    """The CLI runs above do reach the cache: on a working one they leave a tune entry (and a library)."""
    rc, _, err = run_cli("optimize", window_model, "-o", tmp_path / "o.pt2")
    assert rc == 0, err
    assert list((root / "cpu").glob("tune-*.json"))
    if CC is not None:
        assert list((root / "native").glob("cpu_tiles-*.so"))


def test_cache_module_is_the_lowest_layer():
    """attnopt.util imports nothing from attnopt, and no torch: every layer may use it."""
    bad = []
    for f in sorted((Path(cache.__file__).parent).glob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            bad += [f"{f.name}: {n}" for n in names if n.split(".")[0] in ("attnopt", "torch", "numpy")]
    assert not bad
