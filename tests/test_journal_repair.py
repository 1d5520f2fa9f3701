"""The ledger's journal survives a torn last line, and its lock has no grace period (harness.sweep.journal).

Real sweep ledgers (harness.sweep.ledger over harness.sweep.storage.open_storage), real files, real processes
holding and waiting for the lock, real kills. Optuna's own journal backend reads the files back: what is
repaired must be a journal any Optuna reader accepts.
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import TrialState

from harness.sweep.journal import LOCK_SUFFIX
from harness.sweep.ledger import Ledger
from harness.sweep.storage import open_storage

STUDY = "torn/proxy"
REPO = Path(__file__).resolve().parent.parent
# Holds a journal's lock until killed: ours (JournalLock), or Optuna's own with a 1 s grace period.
HOLD = r'''
import sys, time
from pathlib import Path
from optuna.storages.journal import JournalFileOpenLock
from harness.sweep.journal import JournalLock
kind, journal, flag = sys.argv[1:]
lock = JournalLock(journal) if kind == "ours" else JournalFileOpenLock(journal, grace_period=1)
lock.acquire()
Path(flag).write_text(str(time.time()))
time.sleep(3600)
'''
# Opens a ledger the way every sweep process does (open_storage), saying when it starts to and what it read.
OPEN = r'''
import sys
from pathlib import Path
from harness.sweep.ledger import Ledger
from harness.sweep.storage import open_storage
journal, flag = sys.argv[1:]
Path(flag).write_text("opening")
print(len(Ledger(open_storage(journal), "torn/proxy", create=False).trials()))
'''


def _ledger(path: Path, cells: int = 4) -> Ledger:
    """A sweep ledger as a driver and a worker leave it: cells queued, one claimed, one finished."""
    ledger = Ledger(open_storage(str(path)), STUDY, create=True, scale={"name": "proxy", "device": "cpu",
                                                                         "reference_s": [1.0, 2.0]})
    for i in range(cells):
        ledger.enqueue(f"cell{i}", {"objective": "grpo", "seed": i}, {"seed": i, "lr": 1e-3}, 1.0, attempt=1)
    done = ledger.pop("w0", lambda t: path.parent / "x.log")
    ledger.settle(done._trial_id, TrialState.COMPLETE, {"state": "complete", "val_reward": 0.5}, 0.5)
    ledger.pop("w1", lambda t: path.parent / "y.log")
    return ledger


def _records(storage) -> tuple:
    """Everything a ledger holds: the study's attrs and every trial's number, state, attrs and params."""
    sid = storage.get_study_id_from_name(STUDY)
    return (storage.get_study_user_attrs(sid),
            [(t.number, t.state, t.user_attrs, t.params) for t in storage.get_all_trials(sid)])


def _plain(path: Path) -> JournalStorage:
    """Optuna's own journal backend: the reference reader."""
    return JournalStorage(JournalFileBackend(str(path)))


def _side_files(path: Path) -> list[Path]:
    return sorted(path.parent.glob(path.name + ".torn-*"))


def _start(script: str, *args: object) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", script, *map(str, args)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, f"{path} did not appear within {timeout}s"
        time.sleep(0.05)


def test_a_torn_line_breaks_optunas_own_journal_after_one_more_append(tmp_path):
    """Why the repair exists: Optuna's backend appends after a partial last line; the next reader fails."""
    path = tmp_path / "ledger.journal"
    _ledger(path)
    path.write_bytes(path.read_bytes() + b'{"op_code":5,"worker_id":"w","study_id":0,"user_a')
    storage = _plain(path)
    sid = storage.get_study_id_from_name(STUDY)
    storage.set_study_user_attr(sid, "after", 1)  # lands on the torn line
    with pytest.raises(ValueError):  # json.JSONDecodeError: from now on every read of the journal fails
        storage.set_study_user_attr(sid, "after", 2)
    with pytest.raises(ValueError):
        _plain(path)


@pytest.mark.parametrize("tear", ["cut mid-record", "zeros after the last record", "garbage line"])
def test_a_torn_last_line_is_moved_aside_and_every_complete_record_kept(tmp_path, tear, caplog):
    path = tmp_path / "results" / "torn" / "proxy" / "ledger.journal"
    _ledger(path)
    whole = path.read_bytes()
    last = whole.splitlines(keepends=True)[-1]
    if tear == "cut mid-record":  # a writer killed mid-append (or a full disk): half of the last record
        kept, torn = whole[:-len(last)], last[:len(last) // 2]
    elif tear == "zeros after the last record":  # a power loss: the size was updated, the data never written
        kept, torn = whole, b"\0" * 300
    else:  # terminated, but not a record
        kept, torn = whole, b'{"op_code":4,"worker_id":"w","study_id":0,"datetime_start":"2025-\n'
    path.write_bytes(kept + torn)
    (tmp_path / "kept.journal").write_bytes(kept)
    expected = _records(_plain(tmp_path / "kept.journal"))  # what the complete records say, read by Optuna

    reopened = Ledger(open_storage(str(path)), STUDY, create=False)

    assert _records(reopened.storage) == expected
    assert path.read_bytes() == kept
    [side] = _side_files(path)
    assert side.read_bytes() == torn  # nothing silently lost
    warnings = [r.getMessage() for r in caplog.records if r.name == "harness.sweep.journal"]
    assert len(warnings) == 1 and str(side) in warnings[0], warnings
    # The ledger goes on: its writes land, and Optuna's own reader reads them all.
    reopened.enqueue("late", {"objective": "cfpo", "seed": 9}, {"seed": 9}, 1.0, attempt=1)
    reopened.set_attr("after", 1)
    attrs, trials = _records(_plain(path))
    assert attrs["after"] == 1 and len(trials) == len(expected[1]) + 1
    assert len(_side_files(path)) == 1  # a whole journal is left as it is
    Ledger(open_storage(str(path)), STUDY, create=False)
    assert len(_side_files(path)) == 1 and path.read_bytes().endswith(b"\n")


def test_a_writer_killed_mid_append_does_not_break_the_ledger_for_the_others(tmp_path):
    """The tear happens while other processes have the ledger open: their next append cuts it off first."""
    path = tmp_path / "ledger.journal"
    ledger = _ledger(path)
    worker = Ledger(open_storage(str(path)), STUDY, create=False)  # another process's view, opened before
    before = _records(worker.storage)
    whole = path.read_bytes()
    path.write_bytes(whole + b'{"op_code":8,"worker_id":"dead","trial_id":1,"user_attr":{"harness.heartbeat"')
    trial = worker.trials()[1]
    worker.heartbeat(trial._trial_id)  # an append: the torn bytes go first
    assert path.read_bytes().startswith(whole) and path.read_bytes().endswith(b"\n")
    [side] = _side_files(path)
    assert side.read_bytes().startswith(b'{"op_code":8,"worker_id":"dead"')
    attrs, trials = _records(_plain(path))  # Optuna's reader: nothing lost, nothing corrupt
    assert attrs == before[0] and [t[:2] for t in trials] == [t[:2] for t in before[1]]
    assert trials[1][2]["harness.heartbeat"] != before[1][1][2]["harness.heartbeat"]
    assert len(ledger.trials()) == len(before[1])


def test_a_held_lock_is_never_broken_and_dies_with_its_holder(tmp_path):
    """No grace period: a holder that keeps the lock (a slow writer on a slow file system) keeps it however
    long, and a second writer gets it the moment the holder dies, even by SIGKILL. Optuna's own lock, same
    interface, lets the second writer in after its grace period (1 s here, 30 s by default): the same check
    catches it."""
    journal = tmp_path / "ledger.journal"
    journal.touch()
    got_in = {}
    for kind in ("ours", "optuna"):
        holder = _start(HOLD, kind, journal, tmp_path / f"{kind}.held")
        _wait_for(tmp_path / f"{kind}.held", holder)
        waiter = _start(HOLD, kind, journal, tmp_path / f"{kind}.second")
        deadline = time.time() + 5  # five times the grace period Optuna's lock was given
        while time.time() < deadline and not (tmp_path / f"{kind}.second").exists():
            time.sleep(0.05)
        got_in[kind] = (tmp_path / f"{kind}.second").exists()
        assert holder.poll() is None  # the first holder still holds it (as far as it knows)
        holder.kill()
        holder.communicate()
        _wait_for(tmp_path / f"{kind}.second", waiter, timeout=10 if kind == "ours" else 60)
        waiter.kill()
        waiter.communicate()
    assert got_in == {"ours": False, "optuna": True}
    assert (tmp_path / ("ledger.journal" + LOCK_SUFFIX)).exists()


def test_the_repair_runs_under_the_lock(tmp_path):
    """A process opening a torn journal while another writer holds the lock waits for it: until then the
    journal is untouched (no concurrent writer sees a half-repaired file); then it repairs and reads."""
    path = tmp_path / "ledger.journal"
    _ledger(path)
    torn = path.read_bytes() + b'{"op_code":5,"wor'
    path.write_bytes(torn)
    holder = _start(HOLD, "ours", path, tmp_path / "held")
    _wait_for(tmp_path / "held", holder)
    opener = _start(OPEN, path, tmp_path / "opening")
    _wait_for(tmp_path / "opening", opener)
    time.sleep(3)  # well past its imports: it is in open_storage, waiting
    assert opener.poll() is None, opener.communicate()
    assert path.read_bytes() == torn and not _side_files(path)
    holder.kill()
    holder.communicate()
    out, err = opener.communicate(timeout=60)
    assert opener.returncode == 0, err
    assert out.split() == ["4"]
    assert path.read_bytes() == torn[:-len(b'{"op_code":5,"wor')] and len(_side_files(path)) == 1
