"""The directory where worker processes keep their metrics, set up before they start.

Kept apart from `metrics` on purpose: it must not import prometheus_client, which picks
its value storage (in memory, or files in PROMETHEUS_MULTIPROC_DIR) once, when imported.
`serve --workers 1` runs the app in the CLI's own process, so the variable has to be set
before anything imports it.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import tempfile
from pathlib import Path

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# prometheus_client's files: counter_<pid>.db, gauge_livesum_<pid>.db, histogram_<pid>.db, ...
METRIC_FILE = re.compile(r"^(counter|histogram|summary|gauge_\w+)_\d+\.db$")


def multiprocess_dir() -> str | None:
    return os.environ.get(MULTIPROC_ENV) or None


def prepare_multiprocess_dir(configured: str | None, workers: int) -> Path | None:
    """A clean directory for the workers' metrics, exported to them through the environment.

    A configured directory is emptied of old metric files (a previous run's counters would
    otherwise be added to this run's); without one, several workers get a fresh temporary
    directory, removed when the server exits. One worker needs none.
    """
    configured = (configured or "").strip() or None
    if configured is None and workers <= 1:
        return None
    if configured is None:
        path = Path(tempfile.mkdtemp(prefix="gateway-metrics-"))
        atexit.register(shutil.rmtree, path, ignore_errors=True)
    else:
        path = Path(configured)
        path.mkdir(parents=True, exist_ok=True)
        for stale in path.iterdir():
            if METRIC_FILE.match(stale.name):
                stale.unlink(missing_ok=True)
    os.environ[MULTIPROC_ENV] = str(path)
    return path
