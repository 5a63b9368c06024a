"""All-or-nothing writes to the leaderboards folder: the store lock, submission transactions, recovery.

Every write under ``leaderboards/`` for a dataset happens under that dataset's lock
(``leaderboards/.<dataset>.lock``). Taking it (:class:`StoreLock`):

- is announced when another process holds it, and bounded by ``$SALBENCH_LOCK_TIMEOUT`` seconds
  (default 600): past it, :class:`StoreBusyError` (one line: which lock, what to do);
- first completes an interrupted transaction (:func:`recover`) and removes the hidden ``.*.tmp``
  files a killed atomic write left (no other writer can be mid-write while the lock is held).

A submission is committed by :func:`commit_submission`: under the lock its name and weights are
checked again (of two concurrent submissions under one name only the first lands), its weights,
card and result are *staged* (written and fsynced as hidden temporary files next to their
targets), a journal listing ``(staged, target)`` is written atomically, the staged files are
renamed onto their targets, the board files are regenerated, and the journal is removed. A kill
before the journal lands leaves the old state (plus staged debris the next command removes); a kill
after it leaves a state the next command rolls forward (renames what is left, regenerates the
boards, says so; a staged file that has gone missing is named, and the submission must be sent
again). Either way no half-stored submission survives the next command.

Every file is written with the mode of a normally created file (0666 less the umask), like the
boards. :func:`store_snapshot` / :func:`what_a_failed_run_left` let the ``--procs`` launcher say
what a run whose processes died had written.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import time
from pathlib import Path
from typing import Callable

from filelock import FileLock, Timeout

from salbench.benchmark import results as R
from salbench.model_zoo import zoo

DEFAULT_LOCK_TIMEOUT = 600.0


class StoreError(ValueError):
    """The store cannot be written (a folder is not writable, the lock is held too long)."""


class StoreBusyError(StoreError):
    """The store lock could not be taken within the timeout."""


def _boundary(label: str) -> None:
    """Called at every write boundary of a transaction (a no-op; fault-injection tests kill here)."""


def lock_timeout() -> float:
    raw = os.environ.get("SALBENCH_LOCK_TIMEOUT", "")
    try:
        t = float(raw) if raw else DEFAULT_LOCK_TIMEOUT
    except ValueError:
        raise StoreBusyError(f"SALBENCH_LOCK_TIMEOUT must be a number of seconds, got {raw!r}") from None
    if not t >= 0:
        raise StoreBusyError(f"SALBENCH_LOCK_TIMEOUT must be >= 0 seconds, got {raw!r}")
    return t


def journal_path(dataset: str, out_dir: Path | None = None) -> Path:
    return (out_dir or R.leaderboards_dir()) / f".{dataset}.journal.json"


class StoreLock:
    """``with StoreLock(dataset, out_dir):`` the dataset's store lock, announced when waited for,
    bounded by ``timeout`` (default ``$SALBENCH_LOCK_TIMEOUT`` or 600 s); on entry an interrupted
    transaction is completed and temporary-file debris removed (:func:`recover`)."""

    def __init__(self, dataset: str, out_dir: Path | None = None, *, timeout: float | None = None,
                 say: Callable[[str], None] | None = None, results_root: Path | None = None,
                 submissions_dir: Path | None = None):
        self.dataset, self.out_dir = dataset, Path(out_dir or R.leaderboards_dir())
        self.results_root, self.submissions_dir = results_root, submissions_dir
        self.timeout = lock_timeout() if timeout is None else timeout
        self.say = say or _say
        self.path = self.out_dir / f".{dataset}.lock"
        self._lock: FileLock | None = None

    def __enter__(self) -> "StoreLock":
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create {self.out_dir} ({e.strerror or e})") from None
        if not os.access(self.out_dir, os.W_OK | os.X_OK):
            raise StoreError(f"{self.out_dir} is not writable; nothing was written")
        lock = FileLock(str(self.path), timeout=self.timeout)
        t0 = time.monotonic()
        try:
            lock.acquire(timeout=min(1.0, self.timeout))
        except Timeout:
            self.say(f"waiting for {self.path} (held by another salbench process; up to {self.timeout:.0f} s, "
                     "SALBENCH_LOCK_TIMEOUT) ...")
            try:
                lock.acquire(timeout=max(0.0, self.timeout - (time.monotonic() - t0)))
            except Timeout:
                raise StoreBusyError(f"{self.path} is still held by another process after {self.timeout:.0f} s; "
                                     "retry when it is done, or remove the lock file if no salbench process "
                                     "runs (nothing was written)") from None
        self._lock = lock
        try:
            recover(self.dataset, self.out_dir, say=self.say, results_root=self.results_root,
                    submissions_dir=self.submissions_dir)
        except BaseException:
            lock.release()
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None


def check_writable(dataset: str, *, out_dir: Path | None = None, results_root: Path | None = None,
                   submissions_dir: Path | None = None) -> None:
    """Before any work: every folder a submission writes to is writable (or can be created)."""
    from salbench.benchmark import submit as S

    out_dir = Path(out_dir or R.leaderboards_dir())
    for d in (out_dir, Path(results_root or out_dir / "results") / dataset,
              Path(submissions_dir or S.submissions_root()) / dataset):
        probe = d
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
            raise StoreError(f"{probe} is not a writable folder, so {d} cannot be written; fix its permissions "
                                 "or set SALBENCH_LEADERBOARDS_DIR (nothing was scored or written)")


def _tmp_debris(dataset: str, out_dir: Path) -> list[Path]:
    """Hidden temporary files of killed writes in the folders this dataset's lock guards."""
    out = [p for p in out_dir.glob(f".{dataset}*.tmp")]
    for sub in ("results", "submissions"):
        d = out_dir / sub / dataset
        if _real_folder(d) is not None:  # never into a linked folder: its files are not the store's
            out += d.glob(".*.tmp")
    return [p for p in out if _regular(p)]


def _say(message: str) -> None:
    R.warn(message, once=False)


class JournalRefused(StoreError):
    """A journal names something the store did not write (a path outside the dataset's store folders,
    a followed link, a staged file that is not the store's own): nothing it names is touched."""


_SHA_HEX = frozenset("0123456789abcdef")
_TARGET_SUFFIXES = {"results": (".json",), "submissions": (".json", ".safetensors", ".pt2")}
MAX_STAGED_BYTES = 2 << 30  # a staged file is hashed before it is renamed; larger ones are refused


def store_folders(dataset: str, out_dir: Path, *, results_root: Path | None = None,
                  submissions_dir: Path | None = None) -> dict[str, Path]:
    """The folders a transaction of ``dataset`` may write, by kind: results and submissions."""
    from salbench.benchmark import submit as S

    return {"results": Path(results_root or out_dir / "results") / dataset,
            "submissions": Path(submissions_dir or S.submissions_root()) / dataset}


def _real_folder(d: Path) -> Path | None:
    """``d`` resolved, when it is a folder reached without following a link in its last two
    components (``<root>/<dataset>``: a planted link there would lead writes elsewhere), else None."""
    for q in (d, d.parent):
        if q.is_symlink():
            return None
    return d.resolve() if d.is_dir() else None


def _sha_ok(sha) -> bool:
    return isinstance(sha, str) and len(sha) == 64 and set(sha) <= _SHA_HEX


def _regular(p: Path) -> bool:
    """``p`` is a regular file itself (not a link to one, not a FIFO or device)."""
    try:
        return stat.S_ISREG(os.lstat(p).st_mode)
    except OSError:
        return False


def _hash_regular(p: Path) -> str | None:
    """sha256 of a regular file read without following a link or blocking, bounded in size; None otherwise."""
    try:
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_STAGED_BYTES:
            return None
        h = hashlib.sha256()
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
        return h.hexdigest()


def _in_folder(target: Path, folder: Path) -> bool:
    """``target`` names a file directly in ``folder`` (absolute, no ``..``, no link on the way)."""
    if not target.is_absolute() or ".." in target.parts or folder.is_symlink() or folder.parent.is_symlink():
        return False
    if folder.exists():
        real = _real_folder(folder)
        return real is not None and target.parent.resolve() == real
    return target.parent == folder.absolute()


def _entry(raw, folders: dict[str, Path], *, staged_needed: bool) -> tuple[Path | None, Path, str]:
    """One journal entry checked: ``[staged, target, sha256]`` (``staged`` None for a removal). The
    target must be a plain file name in one of ``folders`` (reached without links) with a suffix the
    store writes there; a staged file must sit next to it under the store's temporary name
    (``.<target name>.*.tmp``). Raises :class:`JournalRefused` naming the first offending path."""
    if not isinstance(raw, (list, tuple)) or len(raw) != (3 if staged_needed else 2):
        raise JournalRefused(f"an entry {str(raw)[:80]!r} is not [staged, target, sha256]" if staged_needed
                             else f"an entry {str(raw)[:80]!r} is not [path, sha256]")
    *paths, sha = raw
    if not all(isinstance(q, str) for q in paths) or not _sha_ok(sha):
        raise JournalRefused(f"an entry {str(raw)[:80]!r} has no path string or no sha256")
    target = Path(paths[-1])
    staged = Path(paths[0]) if staged_needed else None
    where = None
    for kind, folder in folders.items():
        if _in_folder(target, folder):
            where = kind
            break
    if where is None:
        raise JournalRefused(f"it names {target}, which is not in this dataset's store folders "
                             f"({', '.join(str(f) for f in folders.values())}) or is reached through a link")
    if target.name.startswith(".") or not target.name.endswith(_TARGET_SUFFIXES[where]):
        raise JournalRefused(f"it names {target}, which is not a file the store writes there")
    if target.is_symlink() or (target.exists() and not _regular(target)):
        raise JournalRefused(f"it names {target}, which is a link or not a regular file")
    if staged is not None:
        if staged.parent != target.parent or not (staged.name.startswith(f".{target.name}.")
                                                   and staged.name.endswith(".tmp")):
            raise JournalRefused(f"its staged file {staged} is not the store's temporary file for {target.name}")
        if staged.is_symlink() or (staged.exists() and not _regular(staged)):
            raise JournalRefused(f"its staged file {staged} is a link or not a regular file")
    return staged, target, sha


def _read_journal(j: Path, dataset: str, folders: dict[str, Path], results_root: Path | None):
    """The checked journal as (op, id, entries, images_sha256), None when unreadable (a kill while
    it was written cannot leave that: it is written atomically); :class:`JournalRefused` when it names
    anything the store did not write."""
    if not _regular(j):
        raise JournalRefused(f"{j.name} is a link or not a regular file")
    try:
        if os.lstat(j).st_size > 1 << 20:
            raise JournalRefused(f"{j.name} is larger than any journal the store writes")
        journal = json.loads(j.read_bytes())
    except (OSError, ValueError):
        return None
    if not isinstance(journal, dict) or journal.get("op") not in ("submit", "remove"):
        raise JournalRefused(f"{j.name} is not a submit or remove journal")
    op = journal["op"]
    raw = journal.get("files") if op == "submit" else journal.get("remove")
    if not isinstance(raw, list) or not raw or len(raw) > 8:
        raise JournalRefused(f"{j.name} lists no files or more than a transaction writes")
    entries = [_entry(e, folders, staged_needed=op == "submit") for e in raw]
    reg = journal.get("regenerate") or {}
    if not isinstance(reg, dict):
        raise JournalRefused(f"{j.name} has a malformed regenerate block")
    want = str(results_root) if results_root else None
    if reg.get("results_root") not in (None, want):
        raise JournalRefused(f"{j.name} asks to regenerate from {reg.get('results_root')!r}, not this store's results")
    images = reg.get("images_sha256")
    if images is not None and not _sha_ok(images):
        raise JournalRefused(f"{j.name} has a malformed image-set hash")
    sid = journal.get("id")
    sid = sid if isinstance(sid, str) and sid.isprintable() and len(sid) <= 200 else "?"
    return op, sid, entries, images


def recover(dataset: str, out_dir: Path | None = None, *, say: Callable[[str], None] = _say,
            results_root: Path | None = None, submissions_dir: Path | None = None) -> list[str]:
    """Complete an interrupted transaction of ``dataset`` (call with the lock held): rename what the
    journal lists and is still staged (a removal: unlink what it lists), regenerate the boards, remove
    the journal; then remove temporary-file debris. Returns what was done (also said through ``say``).

    A journal is trusted only as far as the store could have written it: every path must be a file
    the store writes in this dataset's results or submissions folder (no link followed, no ``..``),
    every staged file the store's own temporary file whose sha256 is the one journalled. Otherwise
    nothing it names is touched: it is moved aside as ``.<dataset>.journal.refused.json`` and
    :class:`JournalRefused` raised (one line)."""
    out_dir = Path(out_dir or R.leaderboards_dir())
    folders = store_folders(dataset, out_dir, results_root=results_root, submissions_dir=submissions_dir)
    done = []
    j = journal_path(dataset, out_dir)
    if j.is_file() or j.is_symlink() or j.exists():
        try:
            checked = _read_journal(j, dataset, folders, results_root)
        except JournalRefused as e:
            aside = out_dir / f".{dataset}.journal.refused.json"
            os.replace(j, aside)  # renames the entry itself (never follows a link), inside the store
            raise JournalRefused(f"refused {j} ({e}); recovery only completes transactions this store wrote, "
                                 f"so nothing it names was touched; it was moved aside to {aside.name}") from None
        if checked is not None:
            op, sid, entries, images = checked
            missing = []  # targets neither completed now nor already in the journalled state
            for staged, target, sha in entries:
                if op == "remove":
                    if _regular(target) and _hash_regular(target) == sha:
                        target.unlink()
                    elif target.exists() or target.is_symlink():
                        missing.append(target)  # another file took its place: left alone
                elif staged is not None and _regular(staged):
                    if _hash_regular(staged) != sha:
                        missing.append(target)  # not the bytes that were staged: left alone
                        continue
                    os.replace(staged, target)
                elif not _regular(target) or _hash_regular(target) != sha:
                    missing.append(target)
            from salbench.benchmark.leaderboard import write_leaderboard

            write_leaderboard(dataset, results_root=results_root, out_dir=out_dir, images_sha256=images)
            if op == "remove":
                done.append(f"completed the interrupted removal of {sid} (the {dataset} board files were regenerated)"
                            + (f"; left alone {len(missing)} file(s) that no longer hold what was removed "
                               f"({', '.join(p.name for p in missing)})" if missing else ""))
            elif missing:
                names = ", ".join(p.name for p in missing)
                done.append(f"could not complete the interrupted submission of {sid}: {len(missing)} of the "
                            f"{len(entries)} file(s) its journal lists were staged but are gone, changed or not in "
                            f"place ({names}); the {dataset} board files were regenerated from what the store holds "
                            f"and the journal removed; submit {sid} again to publish it completely")
            else:
                done.append(f"completed the interrupted submission of {sid} "
                            f"(its card, weights, result and the {dataset} board files are in place)")
        else:
            done.append(f"removed an unreadable journal {j.name} (its transaction never started renaming)")
        j.unlink(missing_ok=True)
    debris = _tmp_debris(dataset, out_dir)
    for p in debris:
        p.unlink(missing_ok=True)
    if debris:
        done.append(f"removed {len(debris)} temporary file(s) left by an interrupted write "
                    f"({', '.join(sorted(p.name for p in debris)[:3])}{', ...' if len(debris) > 3 else ''})")
    for msg in done:
        say(msg)
    return done


def store_snapshot(out_dir: Path | None = None) -> dict[str, tuple[int, int, int]]:
    """``(inode, mtime_ns, size)`` of every file under the leaderboards folder (lock files left out):
    an atomic replace gives a file a new inode, so any write since shows."""
    out_dir = Path(out_dir or R.leaderboards_dir())
    snap = {}
    if out_dir.is_dir():
        for p in out_dir.rglob("*"):
            if p.name.endswith(".lock"):
                continue
            try:
                st = p.stat()
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                snap[p.relative_to(out_dir).as_posix()] = (st.st_ino, st.st_mtime_ns, st.st_size)
    return snap


def what_a_failed_run_left(before: dict, out_dir: Path | None = None) -> str:
    """What a run whose processes died left in the leaderboards folder, compared with ``before``
    (:func:`store_snapshot` taken when it started): one clause for the launcher's error line."""
    out_dir = Path(out_dir or R.leaderboards_dir())
    now = store_snapshot(out_dir)
    changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
    journals = sorted(k for k in now if k.endswith(".journal.json"))
    if journals:
        datasets = sorted({Path(k).name[1:-len(".journal.json")] for k in journals})
        return (f"a process died inside the commit of a submission, so the store may hold a partly committed "
                f"submission ({', '.join(journals)} in {out_dir}); the next salbench command that writes "
                f"{' and '.join(datasets)} (e.g. `salbench leaderboard --dataset {datasets[0]}`) completes or rolls "
                "it back and says which")
    tmp = [k for k in changed if Path(k).name.endswith(".tmp") and k in now]
    kept = [k for k in changed if k not in tmp]
    if kept:
        shown = ", ".join(kept[:3]) + (", ..." if len(kept) > 3 else "")
        return (f"this run had written or replaced {len(kept)} file(s) in {out_dir} before it failed ({shown}); each "
                "is complete (written atomically), and the next `salbench leaderboard` re-uses the stored results "
                "and regenerates the boards")
    if tmp:
        return (f"no result or leaderboard file was written by this run ({len(tmp)} temporary file(s) of an "
                "interrupted write are left; the next salbench command that writes the store removes them)")
    return "no result or leaderboard file was written by this run"


def _stage(target: Path, data: bytes) -> Path:
    """Write ``data`` next to ``target`` as a hidden temporary file, fsynced; return its path."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = zoo.open_temp_file(target.parent, target.name)  # mode 0666 less the umask, as the boards
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return Path(tmp)


def commit_submission(card: dict, payload: bytes, result: dict, *, images_sha256: str | None,
                      submissions_dir: Path | None = None, results_root: Path | None = None,
                      out_dir: Path | None = None) -> None:
    """Publish a scored submission all-or-nothing (call with the dataset's :class:`StoreLock` held):
    name and duplicate checks, then stage, journal, rename, regenerate, unjournal (module docstring)."""
    from salbench.benchmark import submit as S
    from salbench.benchmark.leaderboard import write_leaderboard

    dataset = card["dataset"]
    out_dir = Path(out_dir or R.leaderboards_dir())
    # under the lock: a concurrent submission may have taken the name or landed the same weights
    S.check_name(card, submissions_dir)
    S.check_not_duplicate(card, submissions_dir=submissions_dir, results_root=results_root)
    sdir = (submissions_dir or S.submissions_root()) / dataset
    targets = [(sdir / card["weights"], payload),
               (sdir / f"{card['id']}.json", (json.dumps(card, indent=2) + "\n").encode()),
               R.result_document(result, card, results_root)]
    staged = []
    for target, data in targets:
        staged.append((_stage(target, data), target))
        _boundary(f"staged {target.name}")
    digests = [hashlib.sha256(data).hexdigest() for _, data in targets]
    journal = {"op": "submit", "id": card["id"],
               "files": [[str(a), str(b), h] for (a, b), h in zip(staged, digests)],
               "regenerate": {"results_root": str(results_root) if results_root else None,
                              "images_sha256": images_sha256}}
    zoo.atomic_write_bytes(journal_path(dataset, out_dir), (json.dumps(journal, indent=1) + "\n").encode())
    _boundary("journal written")
    for tmp, target in staged:
        os.replace(tmp, target)
        _boundary(f"renamed {target.name}")
    write_leaderboard(dataset, results_root=results_root, out_dir=out_dir, images_sha256=images_sha256)
    _boundary("boards written")
    journal_path(dataset, out_dir).unlink()
    _boundary("journal removed")


def remove_submission(dataset: str, name: str, *, submissions_dir: Path | None = None,
                      results_root: Path | None = None, out_dir: Path | None = None) -> dict:
    """Take a submission off the board all-or-nothing (call with the dataset's :class:`StoreLock`
    held): its card, weights and stored result are journalled (path and sha256), unlinked, and the
    board files regenerated; a kill after the journal lands is completed by the next command.
    ``name`` is the submission's name or id. Zoo models refuse. Returns the removed card."""
    from salbench.benchmark import submit as S
    from salbench.benchmark.leaderboard import write_leaderboard
    from salbench.model_zoo.zoo import list_cards

    out_dir = Path(out_dir or R.leaderboards_dir())
    if name in {c["id"] for c in list_cards(dataset)}:
        raise StoreError(f"{name} is a {dataset} zoo model; `salbench remove` takes submissions off the board, "
                         "zoo entries are changed by editing model_zoo/cards (nothing was removed)")
    cards = S.list_submission_cards(dataset, submissions_dir)
    match = [c for c in cards if name in (c.get("id"), c.get("name"), f"{dataset}-sub-{S.slug(name)}")]
    if not match:
        known = ", ".join(sorted(str(c.get("name") or c["id"]) for c in cards)) or "none"
        raise StoreError(f"no {dataset} submission named {name!r} (submissions on the board: {known}); "
                         "nothing was removed")
    card = match[0]
    folders = store_folders(dataset, out_dir, results_root=results_root, submissions_dir=submissions_dir)
    sdir = folders["submissions"]
    paths = [sdir / f"{card['id']}.json"]
    weights = card.get("weights")
    if isinstance(weights, str) and Path(weights).name == weights and weights:
        paths.append(sdir / weights)
    rpath = R.result_path(dataset, card["sha256"], root=results_root)
    if _regular(rpath):
        try:
            doc = json.loads(rpath.read_bytes())
            if doc.get("model", {}).get("id") == card["id"]:
                paths.append(rpath)
        except (OSError, ValueError):
            paths.append(rpath)  # an unreadable result of these weights goes with them
    entries = []
    for p in paths:
        if p.is_symlink() or (p.exists() and not _regular(p)):
            raise StoreError(f"{p} is a link or not a regular file; it is not the store's, nothing was removed")
        if _regular(p):
            entries.append([str(p), _hash_regular(p)])
    for e in entries:  # the same checks recovery applies: only store files of this dataset
        try:
            _entry(e, folders, staged_needed=False)
        except JournalRefused as err:
            raise StoreError(f"cannot remove {card['id']}: {err} (nothing was removed)") from None
    images = _committed_images_sha256(dataset)
    journal = {"op": "remove", "id": card["id"], "remove": entries,
               "regenerate": {"results_root": str(results_root) if results_root else None, "images_sha256": images}}
    zoo.atomic_write_bytes(journal_path(dataset, out_dir), (json.dumps(journal, indent=1) + "\n").encode())
    _boundary("journal written")
    for path, _ in entries:
        Path(path).unlink(missing_ok=True)
        _boundary(f"removed {Path(path).name}")
    write_leaderboard(dataset, results_root=results_root, out_dir=out_dir, images_sha256=images)
    _boundary("boards written")
    journal_path(dataset, out_dir).unlink()
    _boundary("journal removed")
    return card


def _committed_images_sha256(dataset: str) -> str | None:
    """The image-set hash of the dataset's committed set (None without one: every result is kept)."""
    from salbench.benchmark.imagesets import imageset_path, read_imageset_doc

    try:
        h = read_imageset_doc(imageset_path(dataset))["images_sha256"]
    except (OSError, ValueError, KeyError):
        return None
    return h if _sha_ok(h) else None
