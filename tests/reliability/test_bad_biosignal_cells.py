"""Case 6 of issue 11 (Biovid CSV): a text value in a numeric cell is named, never turned into NaN."""

from __future__ import annotations

import json
from pathlib import Path

from pkdot.config import load_config
from pkdot.features.physio import extract_physio
from tests.reliability.conftest import extract, tiny_cfg


def _break_cell(csv: Path, row: int, column: str, value: str) -> int:
    """Put ``value`` into data row ``row`` (0-based) of ``column``; returns that cell's 1-based file line."""
    lines = csv.read_text().splitlines()
    sep = "\t" if "\t" in lines[0] else ","
    header = lines[0].split(sep)
    cells = lines[row + 1].split(sep)
    cells[header.index(column)] = value
    lines[row + 1] = sep.join(cells)
    csv.write_text("\n".join(lines) + "\n")
    return row + 2


def test_a_text_cell_quarantines_the_sample_naming_file_line_and_column(
    tiny_biovid: Path, tmp_path: Path
) -> None:
    csv = sorted((tiny_biovid / "biosignals_filtered").rglob("*_bio.csv"))[0]
    line = _break_cell(csv, 100, "gsr", "n/a-ish")
    outcome = extract_physio(csv.name, csv, load_config(preset="demo").features)
    assert outcome.features is None
    assert outcome.reason == f"biosignal file {csv}: line {line}, column 'gsr': 'n/a-ish' is not a number"

    run = tmp_path / "run"
    cfg = tiny_cfg(tiny_biovid, run)
    result = extract(cfg)  # the run goes on without that sample; the others are written
    report = json.loads((run / "features" / "extract_report.json").read_text())
    sample = csv.name.removesuffix("_bio.csv")
    assert report["quarantined"] == [{"sample_id": sample, "modality": "physio", "reason": outcome.reason}]
    assert report["n_written"] == 5 and result.details["counts"]["physio"]["quarantined"] == 1


def test_several_text_cells_name_the_first_and_count_them(tiny_biovid: Path) -> None:
    csv = sorted((tiny_biovid / "biosignals_filtered").rglob("*_bio.csv"))[0]
    _break_cell(csv, 300, "ecg", "x")
    first = _break_cell(csv, 7, "time", "0.0o1")
    outcome = extract_physio(csv.name, csv, load_config(preset="demo").features)
    assert outcome.reason == (
        f"biosignal file {csv}: line {first}, column 'time': '0.0o1' is not a number (2 non-numeric cells in all)"
    )


def test_empty_cells_stay_missing_values_not_errors(tiny_biovid: Path) -> None:
    csv = sorted((tiny_biovid / "biosignals_filtered").rglob("*_bio.csv"))[0]
    for row in (200, 201):
        _break_cell(csv, row, "gsr", "")
    outcome = extract_physio(csv.name, csv, load_config(preset="demo").features)
    assert outcome.features is not None, outcome.reason  # a 2-sample gap is interpolated and reported
    assert outcome.quality["gsr"].interpolated == 2
