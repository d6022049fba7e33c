"""Writing files so that nothing is ever half-written: every output of this bundle goes through here."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_temporaries(path: Path) -> None:
    """Temporary files of ``path`` left by writers that were killed (their process is gone)."""
    for stale in path.parent.glob(f".{path.name}.*.tmp*"):
        pid = stale.name[len(path.name) + 2 :].split(".", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            stale.unlink(missing_ok=True)


def write_atomic(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Write ``path`` through ``write(temporary_path)``, then rename: readers see the old file or the new one.

    The temporary file lies beside ``path`` (same folder, so the rename is atomic, same suffix, so writers that
    choose the format by suffix work), is flushed to disk before the rename, gets the permissions a new file gets
    under the process's umask (``mkstemp`` would leave it ``0600``), and is removed if anything fails; one left
    by a writer that was killed (named with its process id) is removed by the next write of the same file.

    Returns:
        ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path)
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """:func:`write_atomic` of a text file (UTF-8)."""
    return write_atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def append_line_durably(path: str | os.PathLike, text: str) -> None:
    """Append ``text`` (whole lines) to ``path`` with one ``write`` call and flush it to disk, so that an
    interruption leaves at most an unfinished last line, which readers of such logs drop."""
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def check_writable_folder(folder: str | os.PathLike) -> Path:
    """Create ``folder`` if needed and make sure files can be written there, before any work is done.

    Raises:
        PermissionError: naming the folder (one line, not the traceback of a write after inference).
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check.", delete=True)
        probe.close()
    except OSError as err:
        raise PermissionError(f"output folder {str(folder)!r} is not writable: {err.strerror or err}") from None
    return folder
