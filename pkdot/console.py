"""What a ``pkdot`` command shows on the console (WARNING+, status lines, one progress display per stage; INFO
too with ``-v``) and the run's log file ``<run>/logs/pkdot.log`` that keeps every pkdot INFO record. Workers append
JSON epoch records to ``<run>/logs/epochs/<job>.jsonl`` and the driver logs each once (:class:`EpochTail`), so
Ray forwards no line twice."""

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

#: The logger of the few lines a user wants by default (a stage done, where the data set is): INFO on the
#: console even without ``-v``.
STATUS_LOGGER = "pkdot.status"
#: The per-epoch lines: INFO, in the log file always, on the console with ``-v``.
epoch_log = logging.getLogger("pkdot.epochs")


class ConsoleHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of the record (a live rich display replaces it)."""

    # StreamHandler.__init__ assigns the stream: the setter ignores it
    stream = property(lambda self: sys.stderr, lambda self, value: None)  # type: ignore[assignment]


class _ConsoleFormatter(logging.Formatter):
    """``LEVEL logger: message``; a status line (:data:`STATUS_LOGGER`) at INFO is just its message."""

    def format(self, record: logging.LogRecord) -> str:
        if record.name == STATUS_LOGGER and record.levelno == logging.INFO:
            return logging.Formatter("%(message)s").format(record)
        return super().format(record)


def _ours(handler: logging.Handler) -> bool:
    return bool(getattr(handler, "_pkdot_console", False))


def setup_logging(verbose: bool = False) -> None:
    """Install the console handler on the root logger (replacing one installed earlier): INFO and above on the
    console with ``verbose``, else WARNING and above. The ``pkdot`` logger is at INFO either way (the log file)."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if _ours(h) and not isinstance(h, logging.FileHandler)]:
        root.removeHandler(handler)
    handler = ConsoleHandler()
    handler.setLevel(logging.INFO)
    level = logging.INFO if verbose else logging.WARNING
    # records at ``level`` and above, plus the status lines at INFO
    handler.addFilter(lambda r: r.levelno >= level or (r.name == STATUS_LOGGER and r.levelno >= logging.INFO))
    handler.setFormatter(_ConsoleFormatter("%(levelname)s %(name)s: %(message)s"))
    handler._pkdot_console = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("pkdot").setLevel(logging.INFO)
    logging.getLogger("flows").setLevel(logging.INFO)
    # Prefect's own console handler (for processes where Prefect configured the root first) follows suit.
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "INFO" if verbose else "WARNING")


def attach_log_file(run_dir: str | Path) -> Path:
    """Append every pkdot INFO+ record (and every library's WARNING+) to ``<run_dir>/logs/pkdot.log`` (replacing
    a log file attached earlier in this process); returns its path."""
    path = Path(run_dir) / "logs" / "pkdot.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    for old in [h for h in root.handlers if _ours(h) and isinstance(h, logging.FileHandler)]:
        root.removeHandler(old)
        old.close()
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    # pkdot's own records at INFO, other libraries' from WARNING (their INFO is chatter)
    handler.addFilter(lambda r: r.levelno >= logging.WARNING or r.name.partition(".")[0] == "pkdot")
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
def epoch_file(run_dir: str | Path, job_key: str) -> Path:
    """The epoch-record file of a job: ``<run>/logs/epochs/<job key, '/' -> '-'>.jsonl``."""
    return Path(run_dir) / "logs" / "epochs" / (job_key.replace("/", "-") + ".jsonl")


def epoch_recorder(run_dir: str | Path, job_key: str) -> Callable[[str, int, dict[str, float]], None]:
    """A worker's ``WorkerContext.progress`` hook: one JSON line per epoch, appended to the job's epoch file."""
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


class EpochTail:
    """Reads the epoch records the workers append (:func:`epoch_recorder`) and logs each one once; files that
    existed before are read from their end then (a resumed run does not log old epochs again)."""

    def __init__(self, run_dir: str | Path, job_keys: list[str]) -> None:
        self._paths = {key: epoch_file(run_dir, key) for key in job_keys}
        self._offsets = {
            key: path.stat().st_size if path.is_file() else 0 for key, path in self._paths.items()
        }

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
                # [teacher/fold-0/seed-0] teacher epoch 3: loss=0.41 val_accuracy=0.82
                numbers = " ".join(
                    f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in rec.items()
                    if k not in ("job", "phase", "epoch")
                )
                job, phase, epoch = rec.get("job", key), rec.get("phase", "?"), rec.get("epoch", 0)
                epoch_log.info(f"[{job}] {phase} epoch {epoch}: {numbers}")
                latest = rec
        return latest


def describe_record(rec: dict[str, Any] | None) -> str:
    """The current-metric text of a progress display: ``teacher-fold-0-seed-0 teacher ep 3 val_metric=0.820``
    (``val_metric``, else another ``val_*`` entry, else the loss)."""
    if not rec:
        return ""
    preferred = ["val_metric", *[k for k in rec if k.startswith("val_")], "train_loss", "loss"]
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
ray_worker_log = logging.getLogger("pkdot.ray_workers")


def _log_worker_lines(data: dict[str, Any]) -> None:
    """Log the lines a Ray worker wrote through ``pkdot.ray_workers``, at the level a line names near its start
    (a raylet line, a worker death or OOM kill, at least WARNING), else at INFO."""
    pid = data.get("pid")
    name = data.get("actor_name") or data.get("task_name") or ""
    prefix = f"({name + ' ' if name else ''}pid={pid}{', ip=' + data['ip'] if data.get('ip') else ''})"
    lines = data.get("lines") or []
    if pid == "autoscaler":  # the monitor's status dumps: only its events, as Ray's own printer does
        from ray._private.worker import filter_autoscaler_events

        lines = list(filter_autoscaler_events(lines))
    for line in lines:
        found = _WORKER_LEVEL.search(line[:80])
        level = logging.getLevelName(found.group(1)) if found else logging.INFO
        if pid == "raylet":
            level = max(level, logging.WARNING)
        ray_worker_log.log(level, "%s %s", prefix, line)


def route_ray_worker_logs() -> bool:
    """Within a :func:`console_session`, swap Ray's printer of the workers' output (``log_to_driver``) for one
    that logs each line once (:func:`_log_worker_lines`); called after ``ray.init`` (the CLI's init hook).
    Returns whether the workers' output now goes to logging."""
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

    if _OUR_PRINTER in [name for name, _ in dispatcher.handlers]:
        dispatcher.remove_handler(_OUR_PRINTER)
        import ray

        if ray.is_initialized():
            for name, handler in _replaced:
                dispatcher.add_handler(name, handler)
    _replaced.clear()


# ---- progress display ---------------------------------------------------------------------------------------
class StageProgressDisplay:
    """A :mod:`pkdot.progress` listener showing one rich progress display per stage on ``file`` (stderr): from
    its first report until ``done == total``, the next stage or :meth:`close`; off a terminal, one line per stage.
    ``skip``: stages that draw their own display."""

    def __init__(self, *, skip: frozenset[str] = frozenset({"extract"}), file: TextIO | None = None) -> None:
        self.skip, self.file = skip, file
        self._stage: str | None = None
        self._progress: Any = None
        self._task: Any = None
        self._lock = threading.Lock()

    def _start(self, progress: Progress) -> None:
        from rich import progress as rp
        from rich.console import Console

        stream = self.file or sys.stderr
        console = Console(file=stream)
        if not console.is_terminal:  # a log file or a pipe: one unwrapped line at the end of the stage
            console = Console(file=stream, width=max(console.width, 120))
        self._progress = rp.Progress(
            rp.TextColumn("[bold]{task.description}"),
            rp.BarColumn(bar_width=16),
            rp.MofNCompleteColumn(),
            rp.TextColumn("{task.fields[unit]}"),
            rp.TimeElapsedColumn(),
            rp.TextColumn("ETA"),
            rp.TimeRemainingColumn(),
            rp.TextColumn("{task.fields[detail]}"),
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
            fields = {"unit": progress.unit} | ({"detail": progress.detail} if progress.detail else {})
            self._progress.update(self._task, completed=progress.done, total=max(progress.total, 1), **fields)
            if progress.total > 0 and progress.done >= progress.total:
                self._finish()

    def close(self) -> None:
        """End the display of the current stage (a stage that failed or was interrupted)."""
        with self._lock:
            self._finish()


@contextmanager
def console_session(*, verbose: bool = False, run_dir: str | Path | None = None) -> Iterator[Path | None]:
    """Console logging, the run's log file and stage progress displays for a command; yields the log file."""
    global _route_ray_logs
    levels = {name: logging.getLogger(name).level for name in ("", "pkdot", "flows")}
    with ExitStack() as stack:
        for name, level in levels.items():
            stack.callback(logging.getLogger(name or None).setLevel, level)
        setup_logging(verbose)
        stack.callback(remove_handlers)
        # a console handler Prefect put on the root logger earlier would print every record twice: set aside
        root = logging.getLogger()
        for handler in [h for h in root.handlers if type(h).__module__.startswith("prefect.")]:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                root.removeHandler(handler)
                stack.callback(root.addHandler, handler)
        _route_ray_logs = True
        stack.callback(_stop_routing_ray_logs)
        log_path = attach_log_file(run_dir) if run_dir is not None else None
        display = StageProgressDisplay()
        stack.callback(display.close)
        stack.enter_context(listening(display))
        yield log_path
