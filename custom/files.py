"""Writing files so that nothing is ever half-written: every output of this bundle goes through here."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from .cases import CaseError


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
    except OSError as err:  # a full disk says "[Errno 28] No space left on device" and no more
        message = f"{err.strerror or err}: could not write {str(path)!r}{_unchanged(path)}"
        raise (OSError(err.errno, message) if err.errno is not None else OSError(message)) from err
    except RuntimeError as err:  # torch.save reports a full disk as "[enforce fail ...] unexpected pos"
        raise RuntimeError(f"could not write {str(path)!r}{_unchanged(path)}: {err}") from err
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def _unchanged(path: Path) -> str:
    free = shutil.disk_usage(path.parent).free if path.parent.is_dir() else None
    space = f", {free / 2**20:,.0f} MiB free on that disk" if free is not None else ""
    return f" ({'the earlier file is unchanged' if path.exists() else 'nothing was written'}{space})"


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """:func:`write_atomic` of a text file (UTF-8)."""
    return write_atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def append_line_durably(path: str | os.PathLike, text: str) -> None:
    """Append ``text`` (whole lines) to ``path`` with one ``write`` call and flush it to disk, so that an
    interruption leaves at most an unfinished last line, which readers of such logs drop. A link at ``path`` is
    not followed (it could lead out of the output folder)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
        with open(fd, "a", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as err:
        what = "is a link, which is not followed" if Path(path).is_symlink() else "could not be appended to"
        raise OSError(err.errno, f"{err.strerror or err}: {str(path)!r} {what}") from err


def inside_folder(root: str | os.PathLike, *parts: str) -> Path:
    """``root / parts``, checked to stay inside ``root`` with every link followed (``root`` itself may be a link):
    a folder inside the output folder that links elsewhere would otherwise carry writes out of it.

    Raises:
        CaseError: naming the path and where it leads.
    """
    path = Path(root, *parts)
    real, real_root = path.resolve(), Path(root).resolve()
    if real != real_root and real_root not in real.parents:
        raise CaseError(f"{str(path)!r} leads to {str(real)!r}, outside the output folder {str(root)!r}: not written")
    return path


def check_writable_folder(folder: str | os.PathLike) -> Path:
    """Make sure files can be written in ``folder`` before any work is done, and leave nothing behind: for a folder
    that does not exist yet, a uniquely named folder is made and removed where it would be created (a workflow's
    ``initialize``, which ``check_properties`` and ``monai.bundle.load`` also run, then writes nothing); the
    writers create it when they first write (:func:`write_atomic`).

    Raises:
        PermissionError: naming the folder (one line, not the traceback of a write after inference).
    """
    folder = Path(folder)
    # probe the folder, or where it would be created, under a unique name: ranks of one DDP run check at once
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    try:
        if existing == folder:
            tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check.", delete=True).close()
        else:
            os.rmdir(tempfile.mkdtemp(dir=existing, prefix=".write-check."))
    except OSError as err:
        raise PermissionError(f"output folder {str(folder)!r} is not writable: {err.strerror or err}") from None
    return folder
