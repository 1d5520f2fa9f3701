"""What a job's log says of how it ended, for the record of a failed attempt (harness.sweep.worker): its last
line, and whether the job died of the tracking server.
"""
from __future__ import annotations

from pathlib import Path

from harness.redact import redact
from harness.tracking import tracking_uri, unreachable


def last_line(log_path: Path) -> str:
    """The job log's last words, which become the attempt's recorded error (ledger, harness.error tag): any
    URL in them without its password (a job that is not `harness train` writes its log unredacted)."""
    try:
        lines = [ln for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
        return redact(lines[-1].strip()) if lines else ""
    except OSError:
        return ""


def tracking_failure(last_line: str) -> str | None:
    """One line naming the tracking server, when the job died of it (the server is down now, or the job's last
    words name it: MLflow's client says "API request to <server>/api/... failed")."""
    down = unreachable()
    if down:
        return down
    uri = redact(tracking_uri())  # as the job wrote it: its log hides the password (harness.redact)
    if uri.startswith(("http://", "https://")) and uri.rstrip("/") in last_line:
        return f"MLflow tracking server {uri} failed the job's request: {last_line[:200]}"
    return None
