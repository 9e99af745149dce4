"""File safety: output paths checked before any work, and the one atomic writer for every file inhercc writes
(models, JSON, plots, checkpoints)."""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import onnx

from inhercc.errors import InherccError

CHECKPOINT_FILE = "checkpoint.pt"
TEMP_PREFIX = ".inhercc-"  # temp files and folders beside an output: short, whatever the output's name
TEMP_MARGIN = 32  # bytes the temp folder adds to an output's path ("/.inhercc-XXXXXXXX" and ".data")


@functools.lru_cache(maxsize=16)
def _file_facts(realpath: str, mtime_ns: int, size: int) -> tuple[tuple[str, ...], bool]:
    """(external data locations, has value_info) of an ONNX file, parsed once per file version: parsing a
    BERT-base file with inline weights costs over a second, and several checks need these facts."""
    try:
        m = onnx.load(realpath, load_external_data=False)
    except Exception:
        return (), False
    locations = {kv.value for t in m.graph.initializer for kv in t.external_data if kv.key == "location"}
    return tuple(sorted(locations)), len(m.graph.value_info) > 0


def file_facts(path: str | os.PathLike[str]) -> tuple[tuple[str, ...], bool]:
    st = os.stat(path)
    return _file_facts(os.path.realpath(path), st.st_mtime_ns, st.st_size)


def file_size(path: str | os.PathLike[str]) -> int:
    """Size on disk of an ONNX file plus the external data files it references."""
    path = Path(path)
    return path.stat().st_size + sum(f.stat().st_size for f in external_data_files(path) if f.exists())


def external_data_files(path: str | os.PathLike[str]) -> list[Path]:
    """The external data files referenced by an ONNX file."""
    path = Path(path)
    if not os.path.isfile(path):
        return []
    return [path.parent / n for n in file_facts(path)[0]]


def _not_writable(folder: Path) -> str | None:
    """Why a file cannot be created in ``folder``, or None. A real probe: ``os.access`` says yes to root even
    on read-only or virtual file systems."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        return str(e.strerror or e)
    return None


def limits(path: str | os.PathLike[str]) -> tuple[int, int]:
    """``(NAME_MAX, PATH_MAX)`` of the file system a path would be created on (its nearest existing folder)."""
    folder = Path(os.path.abspath(path)).parent
    while not os.path.isdir(folder) and folder != folder.parent:  # os.path: False, not ENAMETOOLONG
        folder = folder.parent
    try:
        return os.pathconf(folder, "PC_NAME_MAX"), os.pathconf(folder, "PC_PATH_MAX")
    except (OSError, ValueError):
        return 255, 4096


def check_name_length(output: str | os.PathLike[str]) -> None:
    """Refuse an output with a file or folder name over NAME_MAX, or a path (with the temp folder the atomic
    writer puts beside it) over PATH_MAX, before any work: the write would fail after it."""
    name_max, path_max = limits(output)
    full = os.path.abspath(output)
    for part in Path(full).parts:
        if len(os.fsencode(part)) > name_max:
            raise InherccError(
                f"output name is too long ({len(os.fsencode(part))} bytes; the file system allows {name_max}): "
                f"{part[:40]}…"
            )
    if len(os.fsencode(full)) + TEMP_MARGIN > path_max:
        raise InherccError(
            f"output path is too long ({len(os.fsencode(full))} bytes; at most {path_max - TEMP_MARGIN} here)"
        )


def check_output_path(output: str | os.PathLike[str], inputs: list[str | os.PathLike[str]] = ()) -> Path:
    """Refuse to write over an input (or its external data), a name or path too long for the file system,
    and a folder that is missing or not writable."""
    out = Path(output)
    check_name_length(out)
    protected = set()
    for p in inputs:
        p = Path(p)
        protected.add(os.path.realpath(p))
        protected.update(os.path.realpath(f) for f in external_data_files(p) if p.exists())
    if os.path.realpath(out) in protected or os.path.realpath(str(out) + ".data") in protected:
        raise InherccError(f"output {out} would overwrite the input; choose another path")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise InherccError(f"output directory {parent} does not exist")
    why = _not_writable(parent)
    if why:
        raise InherccError(f"output directory {parent} is not writable ({why})")
    if out.is_dir():
        raise InherccError(f"output {out} is a directory")
    return out


def path_or_none(value: object) -> str | os.PathLike[str] | None:
    """``value`` when it names a file or folder (data may also be arrays, a dict or an iterable)."""
    return value if isinstance(value, (str, os.PathLike)) else None


def _real(path: str | os.PathLike[str]) -> str:
    return os.path.realpath(path)


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_paths(
    inputs: Sequence[tuple[str, str | os.PathLike[str] | None]],
    outputs: Mapping[str, str | os.PathLike[str] | None],
    *,
    models: Sequence[str | os.PathLike[str]] = (),
    checkpoint: str | os.PathLike[str] | None = None,
) -> None:
    """Before any work: no output (by option label) overwrites an input (or its external data) or writes
    into an input folder (``data`` shards), no two outputs (the ``distill.checkpoint`` folder and its files included)
    are one path — symlinks and ``..`` resolved — and every output folder is writable. ``models``: the
    ONNX inputs, whose external data files are protected too."""
    if checkpoint is not None:  # a file given as the folder: said as such, before any clash with it
        check_checkpoint_folder(checkpoint)
    claims: list[tuple[str, str, str]] = []  # (label, path as given, real path written)
    for label, path in outputs.items():
        if path is not None:
            claims.append((label, path, _real(path)))
    if checkpoint is not None:
        folder = _real(checkpoint)
        for real in (folder, os.path.join(folder, CHECKPOINT_FILE)):
            claims.append(("`distill.checkpoint`", checkpoint, real))
    for in_label, in_path in inputs:
        if in_path is None:
            continue
        real_in, is_folder = _real(in_path), os.path.isdir(in_path)
        for label, path, real in claims:
            if is_folder and _inside(real, real_in) and Path(real).suffix in (".npz", ".npy"):
                raise InherccError(
                    f"{label} {path} is inside the input folder {in_label} {in_path}, whose .npz / .npy files are "
                    "read as data; choose another path"
                )
            if real == real_in:
                raise InherccError(f"{label} {path} would overwrite the input {in_label}; choose another path")
    seen: dict[str, str] = {}
    for label, path, real in claims:
        other = seen.setdefault(real, label)
        if other != label:
            raise InherccError(f"{other} and {label} are the same path ({path}); choose different paths")
    for path in outputs.values():
        if path is not None:
            check_output_path(path, list(models))


def check_checkpoint_folder(folder: str | os.PathLike[str]) -> None:
    """A ``distill.checkpoint`` folder that can be made (or is there) and written into, checked without creating it."""
    path = Path(folder)
    check_name_length(path / CHECKPOINT_FILE)
    if path.is_symlink() and not path.exists():
        raise InherccError(f"`distill.checkpoint` {folder} is a broken link")
    if path.exists() and not path.is_dir():
        raise InherccError(f"`distill.checkpoint` {folder} is a file, not a folder")
    existing = Path(os.path.abspath(path))
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise InherccError(f"`distill.checkpoint` {folder}: {existing} is a file, not a folder")
    why = _not_writable(existing)
    if why:
        raise InherccError(f"`distill.checkpoint` {folder}: {existing} is not writable ({why})")


def write_atomic(path: str | os.PathLike[str], write: Callable[[Path], None], beside: Sequence[str] = ()) -> Path:
    """The one atomic writer: ``write(tmp)`` fills a file in a temp folder made beside ``path`` (with the
    companion files named in ``beside``, e.g. a model's external data), which are then renamed into place,
    companions first. The temp folder goes whatever happens (Ctrl-C included): a failure never leaves a partial
    or stale file. Files keep the permissions ``open`` gives (the umask's), so results are for everyone to read."""
    path = Path(path)
    tmpdir = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=path.parent))  # short: any legal name fits
    try:
        tmp = tmpdir / "file"
        write(tmp)
        for name in beside:
            os.replace(tmpdir / name, path.parent / name)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return path


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write a text file atomically (:func:`write_atomic`)."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write a file atomically (:func:`write_atomic`)."""
    write_atomic(path, lambda tmp: tmp.write_bytes(data))


def write_json(path: str | Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")
