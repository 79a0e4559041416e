"""The run configuration (pkdot/config.py): the whole config, loss names and options included, is validated at
load, from ``--set`` style overrides, dict overrides (the flow's ``build_config``) and YAML files alike."""

from __future__ import annotations

import logging
import time

import pytest
import yaml

from pkdot.config import LOSSES, RunConfig, load_config
from pkdot.errors import ConfigError

VALID_NAMES = "none, kd, fitnet, sp, rkd, pkt, crd, pkdot"


def _error(**kwargs) -> str:
    start = time.perf_counter()
    with pytest.raises(ConfigError) as info:
        load_config(**kwargs)
    assert time.perf_counter() - start < 10.0
    return str(info.value)


def test_a_misspelled_loss_in_set_overrides_fails_naming_the_field_and_the_valid_names() -> None:
    message = _error(overrides=["distill.losses=[kd,pkdto]"])
    assert "distill.losses" in message and "'pkdto'" in message and VALID_NAMES in message
    message = _error(overrides={"distill.losses": ["kd", "pkdto"]})  # the flow's build_config passes a dict
    assert "distill.losses" in message and VALID_NAMES in message


def test_a_misspelled_loss_in_a_yaml_file_fails_naming_the_field_and_the_valid_names(tmp_path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"distill": {"losses": ["none", "pkdto"]}}))
    message = _error(path=path)
    assert str(path) in message and "distill.losses" in message and VALID_NAMES in message


def test_options_a_loss_does_not_take_and_unknown_sections_are_refused_with_the_valid_names() -> None:
    message = _error(overrides=["distill.sp.alpha=1"])
    assert "distill.sp.alpha" in message and "(valid: weight)" in message
    message = _error(overrides=["distill.pkdto.k=3"])
    assert "distill.pkdto" in message and "pkdot" in message and "kd" in message
    message = _error(overrides=["distill.weights.pkdto=1"])
    assert "distill.weights.pkdto" in message and VALID_NAMES in message
    assert "distill.pkdot.k" in _error(overrides=["distill.pkdot.k=0"])
    assert "distill.kd.temperature" in _error(overrides=["distill.kd.temperature=0"])
    assert "distill.crd.momentum" in _error(overrides=["distill.crd.momentum=1.0"])


def test_each_loss_has_its_own_section_with_its_options_and_weight() -> None:
    cfg = load_config(
        overrides=["distill.pkdot.k=all", "distill.kd.temperature=2", "distill.rkd.angle_weight=3"]
    )
    assert (
        cfg.distill.pkdot.k == "all"
        and cfg.distill.kd.temperature == 2.0
        and cfg.distill.rkd.angle_weight == 3
    )
    assert set(LOSSES) <= set(RunConfig().distill.model_dump())
    assert {"distill.pkdot.k", "distill.kd.weight", "distill.crd.n_negatives"} <= set(cfg.flat())
    assert load_config(preset="demo").distill.pkdot.k == 10
    assert load_config(preset="paper").distill.pkdot.k == 30


def test_former_distill_fields_map_onto_the_loss_sections_with_a_warning(tmp_path, caplog) -> None:
    former = {
        "distill": {"k": 5, "anchors": "most", "temperature": 2.0, "options": {"crd": {"feat_dim": 16}}}
    }
    path = tmp_path / "config.yaml"  # as written by pkdot before the per-loss sections
    path.write_text(yaml.safe_dump({**former, "preset": "paper"}))
    with caplog.at_level(logging.WARNING, logger="pkdot.config"):
        cfg = load_config(path, overrides=["distill.pkdot.blur=0.2"])
    assert (cfg.distill.pkdot.k, cfg.distill.pkdot.anchors, cfg.distill.pkdot.blur) == (5, "most", 0.2)
    assert cfg.distill.kd.temperature == 2.0 and cfg.distill.crd.feat_dim == 16
    assert "distill.k -> distill.pkdot.k" in caplog.text
    # a later layer's former field still wins over an earlier layer's new one (the preset sets pkdot.k)
    assert load_config(preset="demo", overrides=["distill.k=4"]).distill.pkdot.k == 4
    assert "contradicts" in _error(overrides={"distill.k": 4, "distill.pkdot.k": 5})


def test_the_former_freeze_flag_maps_onto_student_init() -> None:
    assert (
        load_config(overrides={"train.freeze_student_backbone": False}).train.student_init
        == "teacher-finetune"
    )
    assert (
        load_config(overrides={"train.freeze_student_backbone": True}).train.student_init == "teacher-frozen"
    )
    assert "contradicts" in _error(
        overrides={"train.freeze_student_backbone": True, "train.student_init": "scratch"}
    )
    assert "must be true or false" in _error(overrides={"train.freeze_student_backbone": "yes"})


def test_yaml_text_round_trips(tmp_path) -> None:
    cfg = load_config(
        preset="paper",
        overrides=[f"run_dir={tmp_path}", "distill.losses=[none,pkdot]", "distill.pkdot.weight=0.2"],
    )
    path = tmp_path / "config.yaml"
    path.write_text(cfg.yaml_text())
    assert load_config(path) == cfg


def test_the_authors_protocol_switches_are_off_by_default_and_refused_in_presets(monkeypatch) -> None:
    from pkdot import config

    train = load_config().train
    assert (train.folds, train.select_on, train.teacher_scope, train.optimistic_switches) == (
        5,
        "val",
        "fold",
        [],
    )
    cfg = load_config(overrides=["train.folds=clips", "train.select_on=test", "train.teacher_scope=all"])
    assert cfg.train.optimistic_switches == [
        "train.folds=clips",
        "train.select_on=test",
        "train.teacher_scope=all",
    ]
    assert "crossfit" in _error(overrides=["train.folds=clips", "distill.teacher_targets=crossfit"])
    for switch in ({"folds": "clips"}, {"select_on": "test"}, {"teacher_scope": "all"}):
        bad = config._deep_merge(config.PRESETS["demo"], {"train": switch})
        monkeypatch.setitem(config.PRESETS, "demo", bad)
        message = _error(preset="demo")
        assert "preset 'demo'" in message and "optimistic by construction" in message
    for name in config.PRESETS:
        monkeypatch.undo()
        assert load_config(preset=name).train.optimistic_switches == []
