"""What a person sees on the console: sparta's lines and the errors, nothing else unless `verbose=true`.

Ray forwards every worker's and actor's output to the driver (controller chatter, Ray Train's
reports, DeepSpeed's notices, library warnings). Without `verbose`, the driver asks Ray not to: that
output stays in Ray's log files, and the workers' `sparta` log lines (progress, resume, errors) go to
`console.log` in the run directory, which the driver prints as it grows. The file is also the run's
record of them, on a cluster too (the run directory is shared storage, like the checkpoints).
"""

import logging
import sys
import threading
from pathlib import Path

CONSOLE_FILE = "console.log"


def log_to_console_file(run_dir: Path, rank: int) -> None:
    """In a worker: the `sparta` logger's lines go to the run's console file (rank 0's progress, and
    every rank's warnings and errors)."""
    logger = logging.getLogger("sparta")
    logger.setLevel(logging.INFO)
    if any(getattr(h, "sparta_console", False) for h in logger.handlers):
        return  # a restarted worker group may reuse the process
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(Path(run_dir) / CONSOLE_FILE)
    handler.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    handler.sparta_console = True
    logger.addHandler(handler)


def quiet_driver() -> None:
    """The driver's own libraries: warnings and errors only (MLflow sets its level when imported),
    and not Ray's notice that token authentication is on."""
    import mlflow  # noqa: F401

    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)


class ConsoleTail:
    """Prints the lines appended to a run's console file from now on, until `stop` (a thread)."""

    def __init__(self, run_dir: Path, poll_s: float = 0.2):
        self.path = Path(run_dir) / CONSOLE_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.touch()
        self._offset = self.path.stat().st_size  # a relaunched run's earlier lines were printed back then
        self._poll_s = poll_s
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sparta-console", daemon=True)

    def __enter__(self) -> "ConsoleTail":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stopped.set()
        self._thread.join()
        self._print_new()

    def _run(self) -> None:
        while not self._stopped.wait(self._poll_s):
            self._print_new()

    def _print_new(self) -> None:
        with open(self.path, "rb") as f:
            f.seek(self._offset)
            data = f.read()
        complete = data[: data.rfind(b"\n") + 1]  # a line still being written waits for the next poll
        if complete:
            sys.stdout.write(complete.decode(errors="replace"))
            sys.stdout.flush()
            self._offset += len(complete)
