"""Writing what the user asked for without ever destroying what they gave us.

Rules (each a past bug): an output is never a file the run reads (the model, its ONNX external
data, the plan, the calibration batches), compared by real path and by inode so links and
hard links count; names are checked against the file system's limits before the work starts;
everything is written under temporary names in a private folder beside the output, checked,
reloaded and only then renamed into place, ONNX external data included, so a failure (a full
disk, a read-only folder, ^C) leaves nothing behind. Every write failure is an OutputError
(exit 6).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

from attnopt.errors import OutputError

LARGE_ONNX_BYTES = 1_800_000_000  # protobuf's 2 GB limit, with room for the graph


def onnx_external_files(model_path: Path) -> list[Path]:
    """The external-data files an ONNX model reads (nothing for a .pt2 or an unreadable file)."""
    try:
        import onnx

        proto = onnx.load(str(model_path), load_external_data=False)
    except Exception:  # noqa: BLE001 - not ONNX (a .pt2) or unreadable: the loader reports it
        return []
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    base = model_path.resolve().parent
    found = []
    for t in _get_all_tensors(proto):
        if uses_external_data(t):
            loc = next((e.value for e in t.external_data if e.key == "location"), None)
            if loc:
                found.append(base / loc)
    return found


def _same_file(a: Path, b: Path) -> bool:
    try:
        if a.resolve() == b.resolve():
            return True
        sa, sb = a.stat(), b.stat()
        return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)
    except (OSError, RuntimeError):  # a missing output, a link loop: not the same existing file
        return False


def check_output(output: Path, inputs: Iterable[tuple[str, Path]], *,
                 extra_names: Iterable[str] = ()) -> None:
    """OutputError unless `output` (and the side files it will have, `extra_names` beside it)
    can be written without touching any of `inputs` ((what, path) pairs)."""
    check_name(output)
    parent = output.resolve().parent
    targets = [output] + [parent / n for n in extra_names]
    for what, path in inputs:
        if path is None:
            continue
        for t in targets:
            if _same_file(t, Path(path)):
                raise OutputError(f"output {t} is the {what} ({path}); choose another path")
    if not parent.is_dir():
        raise OutputError(f"output directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"output directory {parent} is not writable")


def check_name(output: Path) -> None:
    """A name the file system will take: checked up front, before minutes of work."""
    try:
        name = os.fsencode(output.name)
        parent = output.resolve().parent
    except (OSError, RuntimeError, ValueError) as e:
        raise OutputError(f"cannot write {output}: {e}") from None
    if b"\0" in name:
        raise OutputError("the output name contains a NUL byte")
    limit_name, limit_path = 255, 4096
    with contextlib.suppress(OSError, ValueError, AttributeError):
        existing = next(p for p in [parent, *parent.parents] if p.exists())
        limit_name = os.pathconf(existing, "PC_NAME_MAX")
        limit_path = os.pathconf(existing, "PC_PATH_MAX")
    # the longest side file we write beside it is NAME.data
    if len(name) + len(b".data") > limit_name:
        raise OutputError(f"output name is too long ({len(name)} bytes; this file system takes "
                          f"{limit_name - len(b'.data')} for an output)")
    if len(os.fsencode(str(parent / output.name))) >= limit_path:
        raise OutputError(f"output path is too long (over {limit_path} bytes)")


@contextlib.contextmanager
def staging(output: Path) -> Iterator[Path]:
    """A private folder beside `output` for its temporary files; removed whatever happens."""
    try:
        tmp = Path(tempfile.mkdtemp(prefix=".attnopt-tmp-", dir=output.resolve().parent))
    except OSError as e:
        raise OutputError(f"cannot write {output}: {e.strerror or e}") from None
    try:
        yield tmp
    except OSError as e:
        raise OutputError(f"cannot write {output}: {e.strerror or e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _publish(tmp_file: Path, final: Path) -> None:
    """Rename into place with the permissions a plain new file would have (mkstemp's are 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_file, 0o666 & ~umask)
    os.replace(tmp_file, final)


def write_bytes_atomically(data: bytes, output: Path) -> None:
    with staging(output) as tmp:
        f = tmp / "out"
        with open(f, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        _publish(f, output)


def write_pt2(ep, output: Path) -> None:
    """Serialize in memory (a failing writer raises, instead of aborting in C++), reload the
    bytes through the safe loader, then write them atomically."""
    from attnopt.frontends.pt2 import load_program_bytes, program_bytes

    try:
        data = program_bytes(ep)
    except OSError as e:
        raise OutputError(f"cannot write {output}: {e.strerror or e}") from None
    load_program_bytes(data, str(output))  # never write what cannot be read back
    write_bytes_atomically(data, output)


def write_onnx(model, output: Path, base_dir: str | None = None) -> None:
    """Checker, ORT load, then rename: never a partial output. Large models keep their weights in
    `<output>.data`, written in the staging folder and renamed just before the model."""
    import onnx
    import onnxruntime as ort
    from onnx.external_data_helper import load_external_data_for_model, uses_external_data

    if base_dir and any(uses_external_data(t) for t in model.graph.initializer):
        # Weights stay beside the input; bring them along so the output stands on its own.
        model = type(model).FromString(model.SerializeToString())
        load_external_data_for_model(model, base_dir)
    data_name = output.name + ".data"
    with staging(output) as tmp:
        f = tmp / output.name
        large = model.ByteSize() > LARGE_ONNX_BYTES
        if large:
            onnx.save_model(model, str(f), save_as_external_data=True, location=data_name)
        else:
            onnx.save_model(model, str(f))
        try:
            onnx.checker.check_model(str(f), full_check=True)
            so = ort.SessionOptions()
            so.log_severity_level = 3  # errors only: the one-line promise
            ort.InferenceSession(str(f), so, providers=["CPUExecutionProvider"])
        except OSError:
            raise
        except Exception as e:  # noqa: BLE001 - the model as given does not load: say so, once
            from attnopt.errors import UnsupportedModel

            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise UnsupportedModel(f"the model to be written does not pass the ONNX checker and "
                                   f"ONNX Runtime, so it is not written: {first}") from None
        if large:
            _publish(tmp / data_name, output.resolve().parent / data_name)
        _publish(f, output)
