"""Each measurement in a Python process of its own.

torch's OpenMP runtime keeps a team of worker threads for each thread that has run a parallel op,
and shortens its spin-waits once it manages more threads than cores. A measurement that follows
another in the same process (bare whisper on the main thread, then the service's model thread)
ran its small ops up to twice as slow (measured), so each one starts from a fresh interpreter.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any


def measure_apart(script: Path, options: list[str], *measure: str) -> Any:
    """Run `script OPTIONS --measure MEASURE...` in a fresh interpreter; return the JSON it printed last."""
    command = [sys.executable, str(script), *options, "--measure", *measure]
    done = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(result: Any) -> None:
    """Print a measurement's result for measure_apart to read."""
    print(json.dumps(result))  # noqa: T201
