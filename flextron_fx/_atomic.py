"""Writing outputs so that a crash never leaves a half-written file or folder under the
final name, and a folder is never deleted before its replacement is complete.

Files go through a temporary sibling and `os.replace`. Folders are built under a temporary
sibling `.NAME.tmp-PID-XXXX` and swapped in with one `renameat2(RENAME_EXCHANGE)` (Linux),
so the name always holds either the old or the new folder. Where the exchange is not
available the old folder is first renamed aside to `.NAME.old-PID-XXXX`; a crash in the
moment between the two renames leaves it there, and the next write (`recover`) renames it
back. Leftovers of a killed writer (its PID is gone) are removed by the next write.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def write_atomic(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write `data` to `path` through a temporary sibling, so that a reader (or a crash)
    never sees half a file: the old file stays until the new one is complete.

    Example:
        >>> write_atomic(Path(tempfile.mkdtemp()) / "a.json", "{}").read_text()
        '{}'
    """
    path = Path(path)
    with _temp_file(path) as tmp, open(tmp, "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    return path


def savefig_atomic(fig, path: str | os.PathLike, **kwargs) -> Path:
    """`fig.savefig(path, **kwargs)` through a temporary sibling (see `write_atomic`)."""
    path = Path(path)
    kwargs.setdefault("format", path.suffix.lstrip(".") or "png")
    with _temp_file(path) as tmp:
        fig.savefig(tmp, **kwargs)
    return path


@contextmanager
def _temp_file(path: Path) -> Iterator[Path]:
    if path.is_dir():
        from .errors import OutputError

        raise OutputError(f"{path} is a folder; give a file name to write to")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        tmp.chmod(0o666 & ~_umask())  # mkstemp makes a private file
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def replace_folder(path: str | os.PathLike) -> Iterator[Path]:
    """A fresh temporary folder next to `path`; when the block succeeds it takes the place
    of `path` (whatever is there is deleted only after the swap). On an exception `path` is
    left as it was.

    Example:
        >>> out = Path(tempfile.mkdtemp()) / "ckpt"
        >>> with replace_folder(out) as tmp:
        ...     _ = (tmp / "a.txt").write_text("new")
        >>> (out / "a.txt").read_text()
        'new'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent))
    try:
        yield tmp
        umask = _umask()
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes a private folder
        for f in tmp.rglob("*"):
            if f.is_file():
                f.chmod(0o666 & ~umask)
                _fsync(f)
        _fsync(tmp)
        if os.path.lexists(path):
            if not _exchange(tmp, path):
                aside = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-{os.getpid()}-",
                                              dir=path.parent))
                os.rename(path, aside / "x")  # aside/x, so a file can be moved aside too
                try:
                    os.rename(tmp, path)
                except BaseException:
                    os.rename(aside / "x", path)
                    shutil.rmtree(aside)
                    raise
                _remove(aside)
            # after an exchange `tmp` holds the old contents: removed below
        else:
            os.rename(tmp, path)
        _fsync(path.parent)
    finally:
        _remove(tmp)


_LEFTOVER = re.compile(r"\.(tmp|old)-(\d+)-[A-Za-z0-9_]+$")


def recover(path: str | os.PathLike) -> list[str]:
    """Undo what a writer of `path` that was killed mid-swap left behind: a folder moved
    aside while `path` is missing is moved back; other leftovers of dead writers are
    removed. Returns a line per action (also logged)."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    done = []
    prefix = f".{path.name}."
    for p in sorted(path.parent.iterdir()):
        m = _LEFTOVER.fullmatch(p.name[len(prefix) - 1:]) if p.name.startswith(prefix) else None
        if m is None or _alive(int(m.group(2))):
            continue
        if m.group(1) == "old" and not os.path.lexists(path) and os.path.lexists(p / "x"):
            os.rename(p / "x", path)
            done.append(f"restored {path} from {p.name}, left by a save that was killed")
        else:
            done.append(f"removed {p.name}, left by a write of {path.name} that was killed")
        _remove(p)
    for line in done:
        log.warning(line)
    return done


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # ours, from a block that did not clean up: nothing else uses it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2); False where that is not available."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    log.debug("renameat2 exchange failed (errno %d): renaming aside", ctypes.get_errno())
    return False


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    elif os.path.lexists(p):
        p.unlink()


def _fsync(p: Path) -> None:
    fd = os.open(p, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask
