"""Issue 24, case 4: a message names the config field that causes it.

``--set train.seeds=[]`` used to fail late with "splits file ...: expected a non-empty list of folds"; it is now
refused at config load naming ``train.seeds``, before any file is written.
"""

from __future__ import annotations

from pkdot.cli import main


def test_an_empty_seed_list_is_refused_naming_train_seeds(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["run", "--no-prefect", "--run-dir", str(run), "--set", "train.seeds=[]"]) == 2
    err = capsys.readouterr().err
    assert "train.seeds" in err and "at least 1 item" in err and "splits file" not in err
    assert not (run / "data").exists() and not (run / "splits.json").exists()
