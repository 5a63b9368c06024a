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
                 say: Callable[[str], None] | None = None):
        self.dataset, self.out_dir = dataset, Path(out_dir or R.leaderboards_dir())
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
            recover(self.dataset, self.out_dir, say=self.say)
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
        if d.is_dir():
            out += d.glob(".*.tmp")
    return [p for p in out if p.is_file()]


def _say(message: str) -> None:
    R.warn(message, once=False)


def recover(dataset: str, out_dir: Path | None = None, *, say: Callable[[str], None] = _say) -> list[str]:
    """Complete an interrupted transaction of ``dataset`` (call with the lock held): rename what the
    journal lists and is still staged, regenerate the boards, remove the journal; then remove
    temporary-file debris. Returns what was done (also said through ``say``)."""
    out_dir = Path(out_dir or R.leaderboards_dir())
    done = []
    j = journal_path(dataset, out_dir)
    if j.is_file():
        try:
            journal = json.loads(j.read_bytes())
            # [staged, target] (older journals) or [staged, target, sha256 of the staged bytes]
            files = [(Path(f[0]), Path(f[1]), f[2] if len(f) > 2 else None) for f in journal["files"]]
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            journal, files = None, []
        if journal is not None:
            missing = []  # targets neither renamed now nor already holding the staged bytes
            for staged, target, sha in files:
                if staged.is_file():
                    os.replace(staged, target)
                elif not target.is_file() or (sha and zoo.sha256_file(target) != sha):
                    missing.append(target)
            from salbench.benchmark.leaderboard import write_leaderboard

            reg = journal.get("regenerate", {})
            write_leaderboard(dataset, results_root=Path(reg["results_root"]) if reg.get("results_root") else None,
                              out_dir=out_dir, images_sha256=reg.get("images_sha256"))
            sid = journal.get("id", "?")
            if missing:
                names = ", ".join(p.name for p in missing)
                done.append(f"could not complete the interrupted submission of {sid}: {len(missing)} of the "
                            f"{len(files)} file(s) its journal lists were staged but are gone and not in place "
                            f"({names}); the {dataset} board files were regenerated from what the store holds "
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
