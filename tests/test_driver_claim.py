"""The one-driver claim on a PostgreSQL ledger (a real server on loopback, as in test_scale_out): exclusive per
sweep, across connections (machines), and gone with its holder when the holder is SIGKILLed."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest
from test_scale_out import postgres  # noqa: F401 - the module's PostgreSQL server fixture

from harness.sweep.claim import ClaimTaken, DriverClaim

HOLD = ("import sys, time\nfrom harness.sweep.claim import DriverClaim\n"
        "DriverClaim(sys.argv[1], 'pgclaim/proxy').take()\nprint('held', flush=True)\ntime.sleep(300)\n")


def test_driver_claim_on_postgresql_is_exclusive_and_dies_with_its_holder(postgres):  # noqa: F811
    first = DriverClaim(postgres, "pgclaim/proxy").take()
    with pytest.raises(ClaimTaken, match="advisory lock of 'pgclaim/proxy' is held"):
        DriverClaim(postgres, "pgclaim/proxy").take()
    other = DriverClaim(postgres, "another/proxy").take()  # another sweep on the same database: its own claim
    assert first.held() and other.held()
    first.release()
    other.release()
    DriverClaim(postgres, "pgclaim/proxy").take().release()

    holder = subprocess.Popen([sys.executable, "-c", HOLD, postgres], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ClaimTaken):
            DriverClaim(postgres, "pgclaim/proxy").take()
        holder.kill()
        holder.wait(timeout=30)
        deadline = time.time() + 60  # the server ends the dead session when it sees the socket closed
        while True:
            try:
                DriverClaim(postgres, "pgclaim/proxy").take().release()
                break
            except ClaimTaken:
                assert time.time() < deadline, "the SIGKILLed holder's claim was never released"
                time.sleep(0.2)
    finally:
        if holder.poll() is None:
            holder.kill()
