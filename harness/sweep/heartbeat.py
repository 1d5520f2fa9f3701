"""An attempt's heartbeat: keeps a running attempt's claim in the ledger fresh, and notices when another
process (a reaper) has settled it meanwhile."""
from __future__ import annotations

import logging
import threading

from optuna.exceptions import UpdateFinishedTrialError

from harness.sweep.ledger import Ledger

log = logging.getLogger("harness.sweep.worker")


class Heartbeat(threading.Thread):
    """Refreshes the attempt's heartbeat; sets `lost` when the ledger says another process settled the
    attempt."""

    def __init__(self, ledger: Ledger, trial_id: int, interval: float):
        super().__init__(daemon=True, name="heartbeat")
        self.ledger, self.trial_id, self.interval = ledger, trial_id, interval
        self.lost, self._done = threading.Event(), threading.Event()

    def run(self) -> None:
        while not self._done.wait(self.interval):
            try:
                self.ledger.heartbeat(self.trial_id)
            except UpdateFinishedTrialError:
                self.lost.set()
                return
            except Exception as e:  # a storage hiccup: the next beat may get through
                log.warning("heartbeat failed: %s", e)

    def stop(self) -> None:
        self._done.set()
        self.join()
