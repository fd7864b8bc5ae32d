"""Files written whole or not at all (atomic files and folders) and JSONL read/write with one-line errors."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from rag_persona.errors import RagPersonaError


def means_local_path(name: str) -> bool:
    """Whether a model or adapter name is meant as a local path (absolute, ./ or ~, or under a folder that
    exists here) rather than a hub id: a missing one is then an error, not a download attempt."""
    if name.startswith((".", "~")):
        return True
    path = Path(name)
    # An empty name has no parts: it is no path (the caller names it as a bad model or adapter).
    return path.is_absolute() or bool(path.parts and Path(path.parts[0]).exists())


def read_jsonl(path: str | Path, missing: str = "no such file") -> Iterator[tuple[int, dict]]:
    """Yield (line number, object) for each non-blank line; one-line errors for everything else."""
    path = Path(path)
    if not path.exists():
        raise RagPersonaError(f"{path}: {missing}")
    if not path.is_file():
        raise RagPersonaError(f"{path}: not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise RagPersonaError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise RagPersonaError(f"{path}: cannot read ({exc.strerror})") from None
    # Only "\n" ends a JSONL record: json.dumps(ensure_ascii=False) leaves U+2028/U+0085 inside strings,
    # which str.splitlines would cut (CRLF files still read: the "\r" is white space to json).
    for number, raw in enumerate(text.split("\n"), start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise RagPersonaError(
                f"{path}:{number}: malformed JSON ({exc.msg} at column {exc.colno})"
            ) from None
        if not isinstance(obj, dict):
            raise RagPersonaError(f"{path}:{number}: expected a JSON object, got {type(obj).__name__}")
        yield number, obj


def jsonl_text(rows: Iterable[dict]) -> str:
    """Rows as JSONL text: one compact object a line, Japanese kept as is."""
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> None:
    """Write rows as JSONL atomically."""
    atomic_write_text(path, jsonl_text(rows))


def write_json(path: str | Path, obj, indent: int = 2) -> None:
    """Write one JSON document atomically (UTF-8, Japanese kept, trailing newline)."""
    atomic_write_text(path, json.dumps(obj, ensure_ascii=False, indent=indent) + "\n")


def fsync_path(path: Path) -> None:
    """Flush a file or folder to disk where the OS allows it (folders: the rename itself)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a file through a synced temporary sibling and a rename: readers see old or new, never half."""
    write_file_atomic(Path(path), lambda tmp: tmp.write_text(text, encoding="utf-8"))


def make_parent(path: Path) -> None:
    """Create the folder path goes into; a file standing where a folder must be is one error line."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise RagPersonaError(
            f"{path}: cannot write there: {path.parent} or a folder above it is a file"
        ) from None


def check_output_file(path: str | Path, flag: str, inputs: Iterable[str | Path] = ()) -> Path:
    """Before any work: an output file path must not be a folder, nor sit inside or on one of the inputs
    (a report written over the weights it reads), and its folder must be creatable."""
    path = Path(path).expanduser().absolute()
    if path.is_dir():
        raise RagPersonaError(f"{flag} {path}: is a folder; name the file to write")
    real = path.resolve()  # through symlinks and `..`: a link into an input is that input
    for given in inputs:
        src = Path(given).expanduser().resolve()
        if real == src or (src in real.parents and real.exists()):
            raise RagPersonaError(f"{flag} {path}: is input {src} or a file in it; refusing to overwrite it")
    make_parent(path)
    return path


def write_file_atomic(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call write(tmp) on a hidden file beside path, sync it, then rename it into place."""
    path = Path(path)
    if path.is_dir():
        raise RagPersonaError(f"{path}: is a folder; name the file to write")
    make_parent(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp)
    try:
        os.close(fd)
        write(tmp)
        fsync_path(tmp)
        # mkstemp files are private (0600); keep an existing file's mode, else an ordinary one.
        tmp.chmod(path.stat().st_mode & 0o777 if path.exists() else 0o644)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_path(path.parent)
    return path


def _siblings(out: Path, kind: str) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.{kind}*"))


def recover_folder(out: Path, *, clean: bool = True) -> None:
    """Undo a crash between the two renames of a swap (restore `.NAME.old-*`) and, with clean, drop stale
    work folders of killed runs (only a writer may clean: a reader would delete a running build's work)."""
    olds = _siblings(out, "old")
    if not out.exists() and olds:
        try:
            os.rename(olds[-1], out)
        except OSError:
            pass  # another process restored it first
        olds = olds[:-1]
    if clean:
        for stale in [*olds, *_siblings(out, "tmp-")]:
            shutil.rmtree(stale, ignore_errors=True)


def check_replaceable(out: Path, marker: str | None, what: str) -> None:
    """Refuse to replace a non-empty folder that is not this kind of output (it holds no `marker` file)."""
    if marker is None or not out.exists():
        return
    if not out.is_dir():
        raise RagPersonaError(f"{out}: exists and is not a folder; refusing to replace it with {what}")
    if any(out.iterdir()) and not (out / marker).exists():
        raise RagPersonaError(
            f"{out}: folder is not empty and holds no {marker}; refusing to replace it with {what}"
        )


@contextmanager
def atomic_folder(out: str | Path, *, marker: str | None = None, what: str = "this output") -> Iterator[Path]:
    """A hidden work folder beside `out`, swapped in for `out` only when the block finishes without error.

    With `marker`, an existing non-empty `out` must contain that file (it is our own earlier output),
    otherwise nothing is touched. Stale work/backup siblings of earlier killed runs are cleaned first,
    and a target lost between the two renames of an earlier swap is restored from its backup.
    """
    out = Path(out).absolute()
    make_parent(out)
    recover_folder(out)
    check_replaceable(out, marker, what)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield work
        # mkdtemp folders are private (0700); the result is an ordinary readable folder.
        for p in [work, *work.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)
            if p.is_file():
                fsync_path(p)
        fsync_path(work)
        _swap(work, out)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)


def _swap(work: Path, out: Path) -> None:
    if not out.exists():
        os.rename(work, out)
    else:
        backup = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        backup.rmdir()
        os.rename(out, backup)
        try:
            os.rename(work, out)
        except BaseException:
            os.rename(backup, out)
            raise
        shutil.rmtree(backup, ignore_errors=True)
    fsync_path(out.parent)


def read_json(path: str | Path, missing: str = "no such file") -> dict:
    """One JSON object from a file, or one line naming the file and what is wrong."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RagPersonaError(f"{path}: {missing}") from None
    except json.JSONDecodeError as exc:
        raise RagPersonaError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg})") from None
    except UnicodeDecodeError as exc:
        raise RagPersonaError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:  # a folder where the file should be, no permission, ...
        raise RagPersonaError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if not isinstance(obj, dict):
        raise RagPersonaError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file, read in 16 MiB chunks (model weights do not fit in memory twice)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()
