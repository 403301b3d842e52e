"""fedsp on Flower: the round driver's exchange as Flower messages, and a ClientApp; glue around the methods.

Importing this package sets the Flower environment every run needs (values
already in the environment win): no telemetry, no update check, no runtime
dependency installation, a SuperExec that looks for work every 0.1 s (not 1 s),
and a project-local Flower home (in the
working directory, ``.cache/flwr``: git-ignored). Modules of this package import ``flwr`` only after it.
"""

from __future__ import annotations

import os
from pathlib import Path

FLOWER_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    # a SuperNode's (and the SuperLink's) SuperExec looks for a message to start an app process for
    # every second by default; a deployed round waits for it at every message
    "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1",
}


def configure_environment() -> Path:
    """Set the Flower variables (unless already set); return the Flower home."""
    for name, value in FLOWER_ENV.items():
        os.environ.setdefault(name, value)
    home = Path(os.environ.setdefault("FLWR_HOME", str(Path.cwd() / ".cache" / "flwr"))).resolve()
    os.environ["FLWR_HOME"] = str(home)
    return home


configure_environment()
