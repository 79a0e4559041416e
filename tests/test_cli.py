"""The `pkdot` command: synth / manifest for every dataset kind, config errors that name the field, and a help
text with its default for every option of every subcommand (plus ``--version`` and examples)."""

from __future__ import annotations

import argparse
import importlib.metadata

import numpy as np
import pandas as pd
import pytest

from pkdot.cli import build_parser, main


@pytest.fixture(scope="module")
def biovid_root(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "biovid"
    assert (
        main(
            [
                "synth",
                "biovid",
                "--out",
                str(out),
                "--subjects",
                "2",
                "--seed",
                "3",
                "--samples-per-class",
                "1",
                "--frame-size",
                "96",
            ]
        )
        == 0
    )
    return out


def test_synth_is_byte_identical_for_a_seed(biovid_root, tmp_path):
    again = tmp_path / "again"
    assert (
        main(
            [
                "synth",
                "biovid",
                "--out",
                str(again),
                "--subjects",
                "2",
                "--seed",
                "3",
                "--samples-per-class",
                "1",
                "--frame-size",
                "96",
            ]
        )
        == 0
    )
    assert (again / "samples.csv").read_bytes() == (biovid_root / "samples.csv").read_bytes()
    for csv in sorted((biovid_root / "biosignals_filtered").rglob("*_bio.csv")):
        twin = again / csv.relative_to(biovid_root)
        assert twin.read_bytes() == csv.read_bytes()


@pytest.mark.parametrize(
    ("task", "rows", "labels"), [("binary", 4, {0, 1}), ("multiclass", 10, {0, 1, 2, 3, 4})]
)
def test_manifest_biovid(biovid_root, tmp_path, task, rows, labels, capsys):
    out = tmp_path / "m.parquet"
    assert (
        main(
            ["manifest", "--dataset", "biovid", "--root", str(biovid_root), "--task", task, "--out", str(out)]
        )
        == 0
    )
    df = pd.read_parquet(out)
    assert len(df) == rows and set(df["label"]) == labels
    assert df["video_path"].map(lambda p: p.endswith(".mp4")).all()
    assert "2 subjects" in capsys.readouterr().out


def test_manifest_affwild2(tmp_path):
    root = tmp_path / "aw"
    assert (
        main(
            [
                "synth",
                "affwild2",
                "--out",
                str(root),
                "--subjects",
                "2",
                "--seed",
                "0",
                "--seconds-per-video",
                "4",
                "--frame-size",
                "96",
            ]
        )
        == 0
    )
    out = tmp_path / "m.parquet"
    assert (
        main(
            [
                "manifest",
                "--dataset",
                "affwild2",
                "--root",
                str(root),
                "--out",
                str(out),
                "--set",
                "data.clip_frames=25",
                "--set",
                "data.clip_stride=25",
            ]
        )
        == 0
    )
    df = pd.read_parquet(out)
    assert len(df) >= 4 and df["valence"].between(-1, 1).all() and (df["label"] == -1).all()
    assert df["audio_path"].notna().all()


def test_manifest_table(tmp_path):
    rng = np.random.default_rng(0)
    table = pd.DataFrame(
        {
            "sample_id": [f"x{i}" for i in range(12)],
            "subject_id": [f"s{i % 3}" for i in range(12)],
            "label": [i % 2 for i in range(12)],
            "face": [rng.normal(size=5).tolist() for _ in range(12)],
            "eeg": [rng.normal(size=7).tolist() for _ in range(12)],
        }
    )
    path = tmp_path / "t.parquet"
    table.to_parquet(path)
    out = tmp_path / "m.parquet"
    assert (
        main(
            [
                "manifest",
                "--dataset",
                "table",
                "--root",
                str(path),
                "--student-modalities",
                "face",
                "--privileged-modalities",
                "eeg",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert sorted(pd.read_parquet(out)["sample_id"]) == sorted(table["sample_id"])


def test_invalid_config_fails_naming_the_field(biovid_root, tmp_path, capsys):
    code = main(
        [
            "manifest",
            "--dataset",
            "biovid",
            "--root",
            str(biovid_root),
            "--out",
            str(tmp_path / "m.parquet"),
            "--set",
            "train.batch_size=-4",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "train.batch_size" in err and not (tmp_path / "m.parquet").exists()


def test_missing_root_is_a_dataset_error(tmp_path, capsys):
    code = main(
        ["manifest", "--dataset", "biovid", "--root", str(tmp_path / "nope"), "--out", str(tmp_path / "m.pq")]
    )
    assert code == 2
    assert "nope" in capsys.readouterr().err


# ---- help texts ------------------------------------------------------------------------------------------------
def _parsers() -> dict[str, argparse.ArgumentParser]:
    """``pkdot`` and every subcommand's parser, by name."""
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return {"pkdot": parser} | {f"pkdot {name}": p for name, p in sub.choices.items()}


def _options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    skip = (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)
    return [a for a in parser._actions if not isinstance(a, skip)]


def test_every_command_is_covered():
    assert set(_parsers()) >= {
        "pkdot",
        *(
            f"pkdot {c}"
            for c in ("synth", "manifest", "extract", "train-teacher", "cache", "distill", "evaluate", "run")
        ),
        "pkdot predict",
    }


@pytest.mark.parametrize("name", sorted(_parsers()))
def test_every_option_has_help_and_shows_its_default(name):
    parser = _parsers()[name]
    formatter = parser._get_formatter()
    rendered = parser.format_help()
    for action in _options(parser):
        what = f"{name} {'/'.join(action.option_strings) or action.dest}"
        assert action.help and len(action.help.strip()) > 10, f"{what}: no help text"
        for option in action.option_strings:
            assert option in rendered, f"{what}: missing from --help"
        if not action.option_strings:
            continue
        shown = formatter._expand_help(action)  # what --help prints for it, default filled in
        if action.required:
            assert "required" in shown, f"{what}: a required option should say so"
        else:
            assert "(default: " in shown, f"{what}: no default in its help: {shown!r}"
            assert "(default: None)" not in shown, f"{what}: says 'None' instead of what that means"


@pytest.mark.parametrize("name", sorted(_parsers()))
def test_help_is_plain_text_with_examples(name):
    text = _parsers()[name].format_help()
    assert "``" not in text and ":func:" not in text and ":class:" not in text
    assert "examples:\n" in text and "pkdot " in text.split("examples:\n", 1)[1]


def test_defaults_are_the_ones_used():
    args = build_parser().parse_args(["synth", "biovid", "--out", "x"])
    shown = build_parser().format_help()
    assert args.subjects == 8 and args.frame_size == 160 and "pkdot run" in shown
    sub_help = _parsers()["pkdot synth"].format_help()
    assert "(default: 8)" in sub_help and "(default: 160)" in sub_help


def test_verbose_flag_before_or_after_the_command():
    assert build_parser().parse_args(["-v", "cache", "--run", "r"]).verbose is True
    assert build_parser().parse_args(["cache", "--run", "r", "-v"]).verbose is True
    assert build_parser().parse_args(["cache", "--run", "r"]).verbose is False


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"pkdot {importlib.metadata.version('pkdot')}"


def test_a_stage_on_a_missing_run_dir_fails_and_leaves_nothing(tmp_path, capsys):
    run = tmp_path / "not-a-run"
    assert main(["cache", "--run", str(run)]) == 2
    assert "config.yaml does not exist" in capsys.readouterr().err
    assert not run.exists()


def test_a_misspelled_loss_fails_in_seconds_before_any_work(tmp_path, capsys):
    """Issue 21: `--set 'distill.losses=[kd,pkdto]'` is refused at config load, naming the field and the valid
    names, before any data is generated; `pkdot distill --loss pkdto` likewise."""
    import time

    from pkdot.config import LOSSES, load_config
    from pkdot.rundir import atomic_write_text

    run = tmp_path / "run"
    t0 = time.monotonic()
    assert main(["run", "--no-prefect", "--run-dir", str(run), "--set", "distill.losses=[kd,pkdto]"]) == 2
    assert time.monotonic() - t0 < 10
    err = capsys.readouterr().err
    assert "distill.losses" in err and "pkdto" in err and all(name in err for name in LOSSES)
    assert not (run / "data").exists() and not (run / "stages").exists()

    atomic_write_text(run / "config.yaml", load_config(overrides={"run_dir": str(run)}).yaml_text())
    assert main(["distill", "--run", str(run), "--loss", "kd,pkdto"]) == 2
    err = capsys.readouterr().err
    assert "--loss" in err and "pkdto" in err and "pkdot" in err
    assert not (run / "stages" / "distill.json").exists()
