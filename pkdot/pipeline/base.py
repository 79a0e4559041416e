"""What a stage is, and :func:`execute`, the only code that decides whether a stage runs (Prefect and the CLI
make no decision of their own): it skips the stage when its marker ``RUN/stages/<stage>.json`` records the same
key (:func:`stage_key`) and intact outputs; otherwise it marks the stage pending (downstream refuses the old
outputs), lets the stage remove stale outputs, runs the body, and records key, fingerprint and output stamps."""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pkdot import rundir
from pkdot.config import RunConfig
from pkdot.errors import StageError, resource_error
from pkdot.rundir import RunDir, atomic_write_json, hash_files, hash_json, output_stamp, source_hash

log = logging.getLogger(__name__)


@dataclass
class StageResult:
    """What a stage hands the next one."""

    stage: str
    path: Path
    fingerprint: str
    skipped: bool = False
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class StageOutput:
    """What a stage body returns: the files it wrote (recorded in its marker), details for people and MLflow,
    and its output fingerprint (default: :func:`pkdot.rundir.hash_files` of ``outputs``)."""

    outputs: list[Path]
    details: dict[str, Any] = field(default_factory=dict)
    fingerprint: str | None = None


@dataclass(frozen=True)
class Stage:
    """One pipeline stage. ``sections``: the config fields its outputs depend on (over-inclusion costs a re-run,
    under-inclusion reuses stale results); ``code``: files/folders under ``pkdot/`` that compute it; ``output``:
    :attr:`StageResult.path`; ``key_extra``: what else enters the key; ``stale(cfg, options)``: the outputs
    removed when its inputs changed; ``before(cfg, options)``: runs before every run of the body; ``is_current``:
    a check beyond the marker; ``always``: run every time."""

    name: str
    sections: tuple[str, ...]
    code: tuple[str, ...]
    output: Callable[[RunDir], Path]
    body: Callable[..., StageOutput]
    help: str
    key_extra: Callable[[RunConfig, dict[str, Any]], dict[str, Any]] | None = None
    stale: Callable[[RunConfig, dict[str, Any]], Iterable[Path]] | None = None
    before: Callable[[RunConfig, dict[str, Any]], None] | None = None
    is_current: Callable[[RunConfig, dict[str, Any]], bool] | None = None
    always: bool = False

    @property
    def command(self) -> str:
        """The command that (re)runs the stage, for messages."""
        return "pkdot extract" if self.name == "manifest" else f"pkdot {self.name}"


#: Source files part of every stage's code (besides the stage's own module).
COMMON_CODE: tuple[str, ...] = ("pipeline/base.py", "pipeline/__init__.py", "rundir.py")


def code_hash(stage: Stage, package_dir: Path | None = None) -> str:
    """Hash of the source code that computes ``stage`` (its :attr:`Stage.code`, its module, :data:`COMMON_CODE`)."""
    base = Path(package_dir or rundir.PACKAGE_DIR)  # read at call time (tests point it at a copy)
    files: list[Path] = []
    own = f"pipeline/{stage.name.replace('-', '_')}.py"
    for entry in (*stage.code, *COMMON_CODE, own):
        p = base / entry
        if p.is_dir():
            files.extend(q for q in p.rglob("*.py") if "__pycache__" not in q.parts)
        elif p.is_file():
            files.append(p)
    return source_hash(files, base)


def stage_key(cfg: RunConfig, stage: Stage, upstream: str, options: dict[str, Any] | None = None) -> str:
    """The key under which ``stage``'s outputs are up to date: 16 hex digits of its config sections (with
    ``seed``), the upstream output fingerprint, its source code and :attr:`Stage.key_extra`."""
    payload: dict[str, Any] = {
        "stage": stage.name,
        "sections": cfg.section_hash(*stage.sections),
        "upstream": upstream or "",
        "code": code_hash(stage),
    }
    if stage.key_extra is not None:
        payload.update(stage.key_extra(cfg, options or {}))
    return hash_json(payload)


# ---- markers ----------------------------------------------------------------------------------------------
def read_marker(cfg: RunConfig, stage: Stage) -> dict | None:
    path = RunDir(cfg.run_dir).marker(stage.name)
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise StageError(f"{path} is not a readable stage marker ({exc}); re-run {stage.command}") from exc
    return doc if isinstance(doc, dict) else None


def changed_outputs(cfg: RunConfig, doc: dict) -> list[str]:
    """The outputs a marker records whose size or mtime is not what the stage wrote (or that are gone)."""
    changed = []
    for rel, stamp in (doc.get("outputs") or {}).items():
        path = Path(cfg.run_dir) / rel
        try:
            if output_stamp(path) != list(stamp):
                changed.append(f"{path} (changed)")
        except OSError:
            changed.append(f"{path} (missing)")
    return changed


def mark_done(
    cfg: RunConfig, stage: Stage, key: str, fingerprint: str, out: StageOutput, seconds: float
) -> None:
    """Record a completed stage: its key, output fingerprint, and the size/mtime of each output file."""
    root = Path(cfg.run_dir).resolve()
    stamps = {
        str(Path(p).resolve().relative_to(root)): output_stamp(p) for p in out.outputs if Path(p).is_file()
    }
    doc = {"inputs": key, "fingerprint": fingerprint, "outputs": stamps, "details": out.details}
    atomic_write_json(RunDir(cfg.run_dir).marker(stage.name), doc | {"seconds": round(seconds, 2)})


def check_upstream(cfg: RunConfig, stages: Sequence[Stage], index: int, upstream: str = "") -> str:
    """The output fingerprint of ``stages[index - 1]``; a :class:`StageError` naming the stage to re-run when it
    has not run, when it or an earlier stage did not complete (running again, or its last run failed) or an output
    it recorded changed, or when ``upstream`` (what the caller was handed) is not what it recorded."""
    previous = stages[index - 1]
    doc = read_marker(cfg, previous)
    if doc is None:
        raise StageError(
            f"stage {previous.name!r} has not completed in {cfg.run_dir}: run `{previous.command}` first"
        )
    for earlier in stages[:index]:  # later stages read these too (features, splits, ...)
        earlier_doc = doc if earlier is previous else read_marker(cfg, earlier)
        if earlier_doc is not None and "fingerprint" not in earlier_doc:
            raise StageError(
                f"stage {earlier.name!r} did not complete in {cfg.run_dir} (it is running, or its last run failed "
                f"or was interrupted, and its old outputs were invalidated): re-run `{earlier.command}`"
            )
        if changed := changed_outputs(cfg, earlier_doc) if earlier_doc else []:
            more = f" and {len(changed) - 5} more" if len(changed) > 5 else ""
            raise StageError(
                f"the outputs of stage {earlier.name!r} changed since it wrote them: {', '.join(changed[:5])}"
                f"{more}; re-run `{earlier.command}`"
            )
    if upstream and upstream != doc["fingerprint"]:
        raise StageError(
            f"stage {previous.name!r} in {cfg.run_dir} recorded outputs {doc['fingerprint']}, not the {upstream} "
            f"this stage was given: re-run `{previous.command}`"
        )
    return str(doc["fingerprint"])


def remove_stale(path: Path) -> None:
    """Remove a stage's own outputs that its changed inputs made stale (a file or a folder)."""
    if path.is_dir():
        log.info("inputs changed: removing stale %s", path)
        shutil.rmtree(path)
    elif path.is_file():
        log.info("removing the old output %s before writing", path)
        path.unlink()


def execute(
    cfg: RunConfig, stages: Sequence[Stage], index: int, upstream: str = "", **options: Any
) -> StageResult:
    """Run ``stages[index]`` unless it is up to date (see the module docstring)."""
    stage = stages[index]
    rd = RunDir(cfg.run_dir)
    if stage.key_extra is not None:  # validates the stage's options before anything else
        stage.key_extra(cfg, options)
    if stage.always:
        key = "always"
    else:
        key = stage_key(cfg, stage, check_upstream(cfg, stages, index, upstream), options)
        doc = read_marker(cfg, stage)
        if doc is not None and doc.get("inputs") == key and "fingerprint" in doc:
            if changed := changed_outputs(cfg, doc):
                log.warning(
                    "stage %s: outputs changed since it ran (%s); running it again", stage.name, changed[:3]
                )
            elif stage.is_current is None or stage.is_current(cfg, options):
                return StageResult(stage.name, stage.output(rd), doc["fingerprint"], True, doc["details"])
        previous = None if doc is None else str(doc.get("inputs", "")).removeprefix("pending:")
        if stage.stale is not None and previous not in (None, key):
            for path in stage.stale(cfg, options):
                remove_stale(path)
        if stage.before is not None:
            stage.before(cfg, options)
        # no fingerprint: downstream refuses the old outputs meanwhile
        atomic_write_json(rd.marker(stage.name), {"inputs": f"pending:{key}"})
    t0 = time.time()
    try:
        out = stage.body(cfg, **options)
    except Exception as exc:  # an exhausted resource: one line, never retried (pkdot.errors.resource_error)
        exhausted = resource_error(exc)
        if exhausted is None or exhausted is exc:
            raise
        raise exhausted from exc
    fingerprint = out.fingerprint or hash_files(p for p in out.outputs if Path(p).is_file())
    mark_done(cfg, stage, key, fingerprint, out, time.time() - t0)
    return StageResult(stage.name, stage.output(rd), fingerprint, False, out.details)
