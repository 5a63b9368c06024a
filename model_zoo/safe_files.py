"""Regular files only: bounded reads that never follow a link or block, and the check before a write.

Everything SalBench reads from its store (results, submission cards and files), its zoo cards and
its image sets goes through :func:`read_regular`: the file is opened with ``O_NOFOLLOW`` (a
symbolic link is refused, never followed) and ``O_NONBLOCK`` (a FIFO never blocks the open), the
open descriptor must be a regular file (not a FIFO, device, socket or folder), its size at most the
caller's cap, and at most ``max_bytes + 1`` bytes are read. A file that is replaced by a larger one
while it is read is refused too. :func:`check_write_target` refuses, before anything is written, a
target that exists and is a link or not a regular file, and :func:`check_folder` a folder that is
reached through a link below the root it must stay in (a planted link there would lead reads and
writes elsewhere).

Refusals are :class:`UnsafeFileError` (a ``ValueError``) with one line naming the file and what it
is; callers turn them into their own error class (``StoredResultError``, ``ImageSetError``, ...).
A missing or unreadable file is the ``OSError`` of the open, as for ``open()``.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_BINARY = getattr(os, "O_BINARY", 0)


class UnsafeFileError(ValueError):
    """A path that is a link, a FIFO, a device, a socket or a folder where a regular file is expected,
    a file larger than its cap, or a folder reached through a link: refused, never followed or read."""


def kind(mode: int) -> str:
    """What a file of ``st_mode`` ``mode`` is, in words ("a symbolic link", "a FIFO (named pipe)", ...).

    >>> kind(stat.S_IFIFO | 0o644), kind(stat.S_IFREG | 0o644)
    ('a FIFO (named pipe)', 'a regular file')
    """
    for test, words in ((stat.S_ISREG, "a regular file"), (stat.S_ISLNK, "a symbolic link"),
                        (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
                        (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder")):
        if test(mode):
            return words
    return "not a regular file"


def _refused(path, what: str, mode: int) -> UnsafeFileError:
    # one wording for reads and writes, so a reader and a writer that meet the same file say one line
    return UnsafeFileError(f"{what} {path} is {kind(mode)}, not a regular file; it is never followed, read or "
                           "replaced (remove it, or put the file itself there)")


def read_regular(path: str | os.PathLike, *, max_bytes: int, what: str = "file") -> bytes:
    """The bytes of the regular file ``path``, read without following a link or blocking, at most
    ``max_bytes`` of them.

    Raises:
        UnsafeFileError: ``path`` is a symbolic link, a FIFO, a device, a socket or a folder, or holds
            more than ``max_bytes`` bytes (one line naming ``what`` and the path).
        OSError: the file is missing or cannot be opened (as ``open()``).
    """
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW | _NONBLOCK | _CLOEXEC | _BINARY)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.EMLINK) and os.path.islink(path):
            raise _refused(path, what, stat.S_IFLNK) from None
        if e.errno == errno.ENXIO:  # a socket (or a FIFO's peer) cannot be opened: say what it is
            try:
                raise _refused(path, what, os.lstat(path).st_mode) from None
            except OSError:
                pass
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _refused(path, what, st.st_mode)
        if st.st_size > max_bytes:
            raise UnsafeFileError(f"{what} {path} is {st.st_size} bytes, more than the {max_bytes} bytes a {what} "
                                  "may hold; it is not read")
        chunks, left = [], max_bytes + 1
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        data = b"".join(chunks)
        if len(data) > max_bytes:
            raise UnsafeFileError(f"{what} {path} grew past the {max_bytes} bytes a {what} may hold while it was "
                                  "read; it is not read")
        return data
    finally:
        os.close(fd)


def is_regular(path: str | os.PathLike) -> bool:
    """``path`` is a regular file itself (not a link to one, not a FIFO, device or folder)."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def check_write_target(path: str | os.PathLike, *, what: str = "file") -> None:
    """Refuse to write ``path`` when it exists and is a link or not a regular file: a link is never
    written through or replaced, a FIFO or device never opened.

    Raises:
        UnsafeFileError: naming ``what``, the path and what it is.
    """
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    except OSError:
        return  # e.g. a parent that is not a folder: the write itself fails and says why
    if not stat.S_ISREG(mode):
        raise _refused(path, what, mode)


def check_folder(folder: str | os.PathLike, root: str | os.PathLike, *, what: str = "folder") -> Path:
    """``folder`` (at or below ``root``) reached without a link in any component below ``root``;
    returns it. ``root`` itself may be reached through links (e.g. ``/tmp`` on macOS).

    Raises:
        UnsafeFileError: ``folder`` is not below ``root``, goes through ``..``, or a component below
            ``root`` is a symbolic link (or not a folder).
    """
    folder, root = Path(folder), Path(root)
    try:
        rel = folder.relative_to(root)
    except ValueError:
        raise UnsafeFileError(f"{what} {folder} is not inside {root}") from None
    if ".." in rel.parts:
        raise UnsafeFileError(f"{what} {folder} goes through '..'; it must be a folder inside {root}")
    q = root
    for part in rel.parts:
        q = q / part
        try:
            mode = os.lstat(q).st_mode
        except FileNotFoundError:
            break  # not created yet: nothing below it exists either
        except OSError:
            break
        if not stat.S_ISDIR(mode):
            raise UnsafeFileError(f"{what} {folder} is reached through {q}, which is {kind(mode)}, not a folder; "
                                  "links are not followed inside the store (replace it by a real folder)")
    return folder
