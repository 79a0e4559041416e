"""Helpers shared by the benchmark scripts: the machine's description, Markdown tables, sibling run directories.

The scripts in ``benchmarks/`` are run as ``python benchmarks/<name>.py`` and put their own folder on
``sys.path`` before importing this module as ``common`` (``benchmarks/`` is not a package).
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
import os
import platform
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from pkdot.errors import StageError
from pkdot.pipeline import STAGES

logger = logging.getLogger(__name__)

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"

#: Environment every benchmark sets before Ray/Prefect/MLflow start (the same values as ``pkdot``'s CLI).
QUIET_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MPLBACKEND": "Agg",
}

#: Run-directory entries that the stages *before* distillation write (docs/interfaces.md). A sibling run that
#: re-runs only ``distill`` + ``evaluate`` links these to its base run.
UPSTREAM_ENTRIES = (
    "manifest.parquet",
    "manifest_report.json",
    "features",
    "splits.json",
    "teacher",
    "embeddings",
)
#: The stages up to the report (what a benchmark run times and reads), from pkdot's one ordered stage list.
STAGES_TO_REPORT = tuple(s.name for s in STAGES[: [s.name for s in STAGES].index("evaluate") + 1])
UPSTREAM_STAGE_MARKERS = ("manifest", "extract", "train-teacher", "cache")


def quiet_environment() -> None:
    """Set :data:`QUIET_ENV` (without overriding values the caller already set)."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)


def machine_info() -> dict[str, Any]:
    """Date, platform, CPU count, Python/torch versions, accelerator and load average of this machine."""
    import torch

    try:
        load = os.getloadavg()
    except OSError:  # not available on every platform
        load = (math.nan, math.nan, math.nan)
    accelerator = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU only)"
    return {
        "date": _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "accelerator": accelerator,
        "load_average": tuple(round(x, 2) for x in load),
    }


def machine_markdown(info: dict[str, Any]) -> str:
    """The machine description as a Markdown bullet list."""
    return "\n".join(
        [
            f"- Date: {info['date']}",
            f"- Machine: `{info['platform']}` ({info['processor']}), {info['cpu_count']} CPUs, "
            f"accelerator: {info['accelerator']}",
            f"- Python {info['python']}, torch {info['torch']} ({info['torch_threads']} intra-op threads)",
            f"- Load average (1/5/15 min) when the benchmark started: {info['load_average']}",
        ]
    )


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub Markdown table; every cell is formatted with ``str``."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        cells = [str(c) for c in row]
        if len(cells) != len(header):
            raise ValueError(f"table row has {len(cells)} cells, header has {len(header)}: {cells}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_result(path: Path, text: str) -> Path:
    """Write a result file atomically (temp file in the same folder, then rename)."""
    from pkdot.rundir import atomic_write_text

    path = Path(path)
    atomic_write_text(path, text)
    return path


def link_upstream(
    base_run: Path,
    sibling_run: Path,
    *,
    entries: Sequence[str] = UPSTREAM_ENTRIES,
    stage_markers: Sequence[str] = UPSTREAM_STAGE_MARKERS,
) -> list[Path]:
    """Make ``sibling_run`` share the upstream artifacts of ``base_run`` through symbolic links.

    Links ``entries`` (files or folders of the run directory) and ``stages/<marker>.json`` of the earlier
    stages, so that the stage functions of :mod:`pkdot.pipeline` see those stages as done (same fingerprints)
    and only the later stages run in ``sibling_run``. The sibling's own ``stages/`` folder is a real folder:
    the stages it runs write their markers there, never into the base run. Existing correct links are kept.

    Returns
    -------
    list of Path
        The links (in ``sibling_run``).

    Raises
    ------
    StageError
        When an entry or marker is missing from ``base_run`` (run its stages first), or a path in
        ``sibling_run`` exists and is not a link to the same base artifact.
    """
    base_run, sibling_run = Path(base_run).resolve(), Path(sibling_run)
    pairs = [(base_run / e, sibling_run / e) for e in entries]
    pairs += [
        (base_run / "stages" / f"{m}.json", sibling_run / "stages" / f"{m}.json") for m in stage_markers
    ]
    links = []
    for source, link in pairs:
        if not source.exists():
            raise StageError(f"{source} does not exist: run the base run's earlier stages first")
        if link.is_symlink():
            if link.resolve() != source.resolve():
                raise StageError(f"{link} links to {link.resolve()}, expected {source}")
        elif link.exists():
            raise StageError(f"{link} exists and is not a link to {source}: use an empty run directory")
        else:
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(source, target_is_directory=source.is_dir())
        links.append(link)
    return links


def fmt_float(value: float, digits: int = 3, signed: bool = False) -> str:
    """A float for a table: ``"—"`` for NaN, ``+`` sign when ``signed``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"
