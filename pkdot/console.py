"""What a ``pkdot`` command shows on the console, and the run's log file that keeps everything else.

By default the console gets WARNING and ERROR lines, one rich progress display per long stage (jobs done of
total, the latest epoch's metric, elapsed time and ETA) and the command's own result lines. Everything at INFO
level -- the per-epoch training lines included -- goes to ``<run>/logs/pkdot.log`` (and the per-epoch metrics
to MLflow). ``pkdot -v`` puts the INFO lines on the console too.

The per-epoch lines travel the same way wherever a job runs: the job's rank-0 worker appends one JSON record
per epoch to ``<run>/logs/epochs/<job>.jsonl`` (:func:`epoch_recorder`; a Ray Train worker's stdout is not
used, so nothing is forwarded twice by Ray), and the driver reads the new records while it waits for the jobs
(:class:`EpochTail`) and logs them once through the ``pkdot.epochs`` logger.

Why lines used to appear twice: Ray Train V2 patches ``print`` in its workers to log the text through the root
logger (to stderr) and, because a Ray worker's ``sys.stdout`` is not ``sys.__stdout__``, to print it as well
(to stdout); Ray forwards both streams to the driver (``log_to_driver``), and its deduplication only merges
identical lines of *different* processes. So workers no longer print (epoch records, ``logging``), the CLI
turns the patch off (``RAY_TRAIN_ENABLE_PRINT_PATCH=0``), and within a console session the Ray workers'
forwarded output goes to logging (:func:`route_ray_worker_logs`: the log file; the console with ``-v``, or
when a line is a WARNING/ERROR) instead of Ray's own printer.

Example::

    with console_session(verbose=False, run_dir=Path("runs/demo")):
        run_all(cfg)  # progress on stderr, full log in runs/demo/logs/pkdot.log
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, TextIO

from pkdot.progress import Progress, listening

#: The run's log file, relative to the run directory.
LOG_FILE = Path("logs") / "pkdot.log"
#: Per-job files of epoch records written by the workers, relative to the run directory.
EPOCH_DIR = Path("logs") / "epochs"
#: The logger of the per-epoch lines (INFO: in the log file always, on the console with ``-v``).
EPOCH_LOGGER = "pkdot.epochs"
#: The logger of the few lines a user wants by default (a stage done, where the data set is): INFO on the
#: console even without ``-v``.
STATUS_LOGGER = "pkdot.status"

_CONSOLE_FORMAT = "%(levelname)s %(name)s: %(message)s"
_STATUS_FORMAT = "%(message)s"
_FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

epoch_log = logging.getLogger(EPOCH_LOGGER)


class ConsoleHandler(logging.StreamHandler):
    """A handler that writes to whatever ``sys.stderr`` is at the time of the record.

    A live rich display replaces ``sys.stderr`` with a proxy that prints above the bar; a handler holding
    the original stream would draw through the bar instead.
    """

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:  # StreamHandler.__init__ assigns it; the property wins
        pass


class _ConsoleFormatter(logging.Formatter):
    """``LEVEL logger: message``; a status line (:data:`STATUS_LOGGER`) at INFO is just its message."""

    def __init__(self) -> None:
        super().__init__(_CONSOLE_FORMAT)
        self._plain = logging.Formatter(_STATUS_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        if record.name == STATUS_LOGGER and record.levelno == logging.INFO:
            return self._plain.format(record)
        return super().format(record)


class _ConsoleThreshold(logging.Filter):
    """Records at ``level`` and above, plus the status lines (:data:`STATUS_LOGGER`) at INFO."""

    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= self.level or (
            record.name == STATUS_LOGGER and record.levelno >= logging.INFO
        )


class _OnlyLibraryInfo(logging.Filter):
    """Lets pkdot's own records through at INFO, other libraries' from WARNING (their INFO is chatter)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or record.name == "pkdot" or record.name.startswith("pkdot.")


def _ours(handler: logging.Handler) -> bool:
    return bool(getattr(handler, "_pkdot_console", False))


def _prefect_console_handlers(logger: logging.Logger) -> list[logging.Handler]:
    """Prefect's stream handlers on ``logger`` (its console handler), not pkdot's."""
    return [
        h
        for h in logger.handlers
        if not _ours(h)
        and type(h).__module__.startswith("prefect.")
        and isinstance(h, logging.StreamHandler)
        and not isinstance(h, logging.FileHandler)
    ]


def setup_logging(verbose: bool = False) -> None:
    """Install the console handler on the root logger (replacing one installed earlier).

    Parameters
    ----------
    verbose : INFO and above on the console (every library), else WARNING and above.

    The ``pkdot`` logger is set to INFO either way, so its records reach the run's log file
    (:func:`attach_log_file`); other libraries' INFO records stay below the root level unless ``verbose``.
    Prefect keeps a root logger that already has a handler, so this must run before Prefect is imported.
    """
    root = logging.getLogger()
    for handler in [h for h in root.handlers if _ours(h) and not isinstance(h, logging.FileHandler)]:
        root.removeHandler(handler)
    handler = ConsoleHandler()
    handler.setLevel(logging.INFO)
    handler.addFilter(_ConsoleThreshold(logging.INFO if verbose else logging.WARNING))
    handler.setFormatter(_ConsoleFormatter())
    handler._pkdot_console = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    logging.getLogger("pkdot").setLevel(logging.INFO)
    logging.getLogger("flows").setLevel(logging.INFO)
    # Prefect's own console handler (for processes where Prefect configured the root first) follows suit.
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "INFO" if verbose else "WARNING")


def attach_log_file(run_dir: str | Path) -> Path:
    """Write every pkdot INFO+ record (and every library's WARNING+) to ``<run_dir>/logs/pkdot.log``.

    Appends (a resumed run continues the same file). Replaces a log file attached earlier in this process.

    Returns
    -------
    Path
        The log file.
    """
    path = Path(run_dir) / LOG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    for old in [h for h in root.handlers if _ours(h) and isinstance(h, logging.FileHandler)]:
        root.removeHandler(old)
        old.close()
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter(_FILE_FORMAT))
    handler.addFilter(_OnlyLibraryInfo())
    handler._pkdot_console = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    logging.getLogger("pkdot").setLevel(logging.INFO)
    return path


def remove_handlers() -> None:
    """Remove (and close) the handlers :func:`setup_logging` and :func:`attach_log_file` installed."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if _ours(h)]:
        root.removeHandler(handler)
        handler.close()


# ---- per-epoch lines ----------------------------------------------------------------------------------------
def format_epoch(job_key: str, phase: str, epoch: int, record: dict[str, Any]) -> str:
    """``[teacher/fold-0/seed-0] teacher epoch 3: loss=0.41 val_accuracy=0.82`` (``epoch`` left out)."""
    extras = " ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items() if k != "epoch"
    )
    return f"[{job_key}] {phase} epoch {epoch}: {extras}"


def epoch_file(run_dir: str | Path, job_key: str) -> Path:
    """The epoch-record file of a job: ``<run>/logs/epochs/<job key, '/' -> '-'>.jsonl``."""
    return Path(run_dir) / EPOCH_DIR / (job_key.replace("/", "-") + ".jsonl")


def epoch_recorder(run_dir: str | Path, job_key: str) -> Callable[[str, int, dict[str, float]], None]:
    """A ``WorkerContext.progress`` hook for a worker: one JSON line per epoch in the job's epoch file.

    Each record is written with one ``write`` on a file opened for appending, so a reader never sees half a
    line from a live writer for more than one poll (it waits for the newline).
    """
    path = epoch_file(run_dir, job_key)
    path.parent.mkdir(parents=True, exist_ok=True)

    def record(phase: str, epoch: int, metrics: dict[str, float]) -> None:
        line = json.dumps(
            {"job": job_key, "phase": phase, "epoch": int(epoch)}
            | {k: float(v) for k, v in metrics.items() if k != "epoch"}
        )
        with open(path, "a", encoding="utf-8") as f:
            f.write(line + "\n")

    return record


def epoch_logger(job_key: str) -> Callable[[str, int, dict[str, float]], None]:
    """A ``WorkerContext.progress`` hook for a job run in the driver: one ``pkdot.epochs`` INFO line."""

    def log_epoch(phase: str, epoch: int, metrics: dict[str, float]) -> None:
        epoch_log.info(format_epoch(job_key, phase, epoch, metrics))

    return log_epoch


class EpochTail:
    """Reads the epoch records the workers append (:func:`epoch_recorder`) and logs each one once.

    ``poll()`` reads what was appended since the last call to the files of the given jobs (files that existed
    before the tail started are read from their end at that time: a resumed run does not log old epochs
    again) and returns the newest record, from which a progress display shows the current metric.
    """

    def __init__(self, run_dir: str | Path, job_keys: list[str]) -> None:
        self._offsets: dict[str, int] = {}
        self._paths = {key: epoch_file(run_dir, key) for key in job_keys}
        for key, path in self._paths.items():
            self._offsets[key] = path.stat().st_size if path.is_file() else 0

    def poll(self, job_keys: list[str] | None = None) -> dict[str, Any] | None:
        """Log the new records of ``job_keys`` (default: all); return the newest one read, or None."""
        latest: dict[str, Any] | None = None
        for key in job_keys if job_keys is not None else list(self._paths):
            path = self._paths.get(key)
            if path is None or not path.is_file():
                continue
            with open(path, "rb") as f:
                f.seek(self._offsets[key])
                chunk = f.read()
            complete = chunk[: chunk.rfind(b"\n") + 1]  # a line still being written waits for the next poll
            self._offsets[key] += len(complete)
            for raw in complete.splitlines():
                try:
                    rec = json.loads(raw)
                except ValueError:
                    epoch_log.warning("%s: unreadable epoch record %r", path, raw[:200])
                    continue
                metrics = {k: v for k, v in rec.items() if k not in ("job", "phase", "epoch")}
                epoch_log.info(
                    format_epoch(rec.get("job", key), rec.get("phase", "?"), rec.get("epoch", 0), metrics)
                )
                latest = rec
        return latest


def describe_record(rec: dict[str, Any] | None) -> str:
    """The current-metric text of a progress display: ``teacher-fold-0-seed-0 teacher ep 3 val_metric=0.820``.

    The validation metric the job selects on (``val_metric``), else another ``val_*`` entry, else the loss.
    """
    if not rec:
        return ""
    keys = [k for k in rec if k not in ("job", "phase", "epoch")]
    preferred = ["val_metric"] + [k for k in keys if k.startswith("val_")] + ["train_loss", "loss"]
    metric = next((k for k in preferred if k in rec), None)
    value = f" {metric}={rec[metric]:.3f}" if metric is not None else ""
    job = str(rec.get("job", "")).replace("/", "-")
    return f"{job} {rec.get('phase', '')} ep {rec.get('epoch', '?')}{value}"


# ---- Ray's worker output ------------------------------------------------------------------------------------
#: The handler ``ray.init(log_to_driver=True)`` registers to print the workers' stdout/stderr on the driver.
_RAY_PRINTER = "ray_print_logs"
_OUR_PRINTER = "pkdot_worker_logs"
_route_ray_logs = False
_WORKER_LEVEL = re.compile(r"\b(WARNING|ERROR|CRITICAL)\b")
_LEVELS = {"WARNING": logging.WARNING, "ERROR": logging.ERROR, "CRITICAL": logging.CRITICAL}
ray_worker_log = logging.getLogger("pkdot.ray_workers")


def _log_worker_lines(data: dict[str, Any]) -> None:
    """Log the lines a Ray worker wrote (what Ray would print) through ``pkdot.ray_workers``.

    A line is logged at the level it names (``WARNING``/``ERROR``/``CRITICAL`` near its start, as Python's
    logging writes it in a worker; any raylet line is a WARNING: those are worker deaths and OOM kills), else
    at INFO: the log file always, the console with ``-v``.
    """
    pid = data.get("pid")
    name = data.get("actor_name") or data.get("task_name") or ""
    prefix = f"({name + ' ' if name else ''}pid={pid}{', ip=' + data['ip'] if data.get('ip') else ''})"
    lines = data.get("lines") or []
    if pid == "autoscaler":  # the monitor's status dumps: only its events, as Ray's own printer does
        from ray._private.worker import filter_autoscaler_events

        lines = list(filter_autoscaler_events(lines))
    for line in lines:
        found = _WORKER_LEVEL.search(line[:80])
        level = _LEVELS[found.group(1)] if found else logging.INFO
        if pid == "raylet":
            level = max(level, logging.WARNING)
        ray_worker_log.log(level, "%s %s", prefix, line)


def route_ray_worker_logs() -> bool:
    """Within a :func:`console_session`, send Ray's worker output to logging instead of the driver's console.

    With ``log_to_driver`` Ray prints every line a worker writes (stdout and stderr) on the driver's stdout or
    stderr; this swaps that printer for one that logs each line once (:func:`_log_worker_lines`). Called by
    ``pkdot.ray_utils.ensure_ray`` after ``ray.init`` (the CLI adds it as an init hook); outside a console session it
    does nothing and Ray prints as usual.

    Returns
    -------
    bool
        Whether the workers' output now goes to logging.
    """
    if not _route_ray_logs:
        return False
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    # Every ray.init (a stage that shut its Ray down and a later one that starts another) adds Ray's printer
    # again, while ours stays registered: take Ray's out each time.
    names = [name for name, _ in dispatcher.handlers]
    if _RAY_PRINTER in names:
        _replaced[:] = [pair for pair in dispatcher.handlers if pair[0] == _RAY_PRINTER][:1]
        dispatcher.remove_handler(_RAY_PRINTER)
    elif _OUR_PRINTER not in names:  # log_to_driver=False: nothing reaches this process to route
        return False
    if _OUR_PRINTER not in names:
        dispatcher.add_handler(_OUR_PRINTER, _log_worker_lines)
    return True


#: Ray's printer while ours replaces it (given back at the end of the session if Ray is still up).
_replaced: list[tuple[str, Callable[[dict[str, Any]], None]]] = []


def _stop_routing_ray_logs() -> None:
    global _route_ray_logs
    _route_ray_logs = False
    if "ray" not in sys.modules:
        return
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    names = [name for name, _ in dispatcher.handlers]
    if _OUR_PRINTER in names:
        dispatcher.remove_handler(_OUR_PRINTER)
        import ray

        if ray.is_initialized():
            for name, handler in _replaced:
                dispatcher.add_handler(name, handler)
    _replaced.clear()


# ---- progress display ---------------------------------------------------------------------------------------
class StageProgressDisplay:
    """A :mod:`pkdot.progress` listener that shows one rich progress display per stage on stderr.

    The display of a stage starts with its first report and ends when ``done == total`` (or when the next
    stage reports, or on :meth:`close`). On a terminal it redraws in place; elsewhere (a pipe, a CI log) rich
    prints it once, when it ends: one line per stage.

    Parameters
    ----------
    skip : stages that draw their own display (``extract`` has a per-modality bar of samples).
    file : the stream (default ``sys.stderr``; a test passes a buffer).
    """

    def __init__(self, *, skip: frozenset[str] = frozenset({"extract"}), file: TextIO | None = None) -> None:
        self.skip = skip
        self.file = file
        self._stage: str | None = None
        self._progress: Any = None
        self._task: Any = None
        self._lock = threading.Lock()

    def _start(self, progress: Progress) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.progress import Progress as RichProgress

        stream = self.file or sys.stderr
        console = Console(file=stream)
        if not console.is_terminal:  # a log file or a pipe: one unwrapped line at the end of the stage
            console = Console(file=stream, width=max(console.width, 120))
        self._progress = RichProgress(
            TextColumn("[bold]{task.description}"),
            BarColumn(bar_width=16),
            MofNCompleteColumn(),
            TextColumn("{task.fields[unit]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[detail]}"),
            console=console,
            transient=False,
            # jobs take minutes: estimate the rate over the whole stage, not rich's default last 30 s
            speed_estimate_period=24 * 3600.0,
        )
        self._progress.start()
        self._task = self._progress.add_task(
            progress.stage, total=max(progress.total, 1), unit=progress.unit, detail=""
        )
        self._stage = progress.stage

    def _finish(self) -> None:
        if self._progress is not None:
            self._progress.stop()
        self._progress, self._task, self._stage = None, None, None

    def __call__(self, progress: Progress) -> None:
        if progress.stage in self.skip:
            return
        with self._lock:
            if self._stage != progress.stage:
                self._finish()
                self._start(progress)
            detail = getattr(progress, "detail", "") or ""
            fields: dict[str, Any] = {"unit": progress.unit}
            if detail:
                fields["detail"] = detail
            self._progress.update(self._task, completed=progress.done, total=max(progress.total, 1), **fields)
            if progress.total > 0 and progress.done >= progress.total:
                self._finish()

    def close(self) -> None:
        """End the display of the current stage (a stage that failed or was interrupted)."""
        with self._lock:
            self._finish()


@contextmanager
def console_session(*, verbose: bool = False, run_dir: str | Path | None = None) -> Iterator[Path | None]:
    """Console logging, the run's log file and the stage progress displays, for the duration of a command.

    Yields the log file (None without a run directory). On exit the handlers are removed and closed.
    """
    global _route_ray_logs
    levels = {name: logging.getLogger(name).level for name in ("", "pkdot", "flows")}
    with ExitStack() as stack:
        for name, level in levels.items():
            stack.callback(logging.getLogger(name or None).setLevel, level)
        setup_logging(verbose)
        stack.callback(remove_handlers)
        # One console: a console handler Prefect put on the root logger earlier in this process (when it was
        # imported before the session, e.g. by a test or a notebook) would print every record a second time,
        # at its own level. It is set aside for the session and put back after.
        root = logging.getLogger()
        for handler in _prefect_console_handlers(root):
            root.removeHandler(handler)
            stack.callback(root.addHandler, handler)
        _route_ray_logs = True
        stack.callback(_stop_routing_ray_logs)
        log_path = attach_log_file(run_dir) if run_dir is not None else None
        display = StageProgressDisplay()
        stack.callback(display.close)
        stack.enter_context(listening(display))
        yield log_path
