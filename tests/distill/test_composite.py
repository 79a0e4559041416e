"""Sums of registered losses (``kd+pkdot``) and the structure-faithful PKDOT variants (``pkdot-most``, ``pkdot-all``)."""

from __future__ import annotations

import pytest
import torch

from pkdot.config import DistillConfig, load_config
from pkdot.distill import CompositeLoss, build_loss, total_loss
from pkdot.distill.kd import kd_loss
from pkdot.distill.pkdot import pkdot_loss
from pkdot.errors import ConfigError

DIMS = {"student_dim": 12, "teacher_dim": 20, "num_outputs": 3, "regression": False, "num_samples": 50}


def test_a_sum_builds_each_term_with_its_options_and_its_total_is_the_weighted_sum(make_batch) -> None:
    cfg = DistillConfig(
        kd={"weight": 0.5, "temperature": 2.0}, pkdot={"k": 5, "weight": 3.0}, task_weight=2.0
    )
    loss = build_loss("kd+pkdot", **DIMS, options=cfg.options("kd+pkdot"))
    assert isinstance(loss, CompositeLoss) and loss.name == "kd+pkdot" and set(loss.terms) == {"kd", "pkdot"}
    batch = make_batch()
    terms = loss(batch)
    kd = kd_loss(batch.student_logits, batch.teacher_logits, 2.0)
    pk = pkdot_loss(batch.student_z, batch.teacher_z, k=5)
    torch.testing.assert_close(terms["kd"], kd)
    torch.testing.assert_close(terms["pkdot"], pk)
    task = batch.student_logits.pow(2).mean()
    out = total_loss(task, terms, cfg, "kd+pkdot")
    assert set(out) == {"loss", "loss_task", "loss_kd", "loss_pkdot"}
    torch.testing.assert_close(out["loss"], 2.0 * task + 0.5 * kd + 3.0 * pk)
    torch.testing.assert_close(out["loss_pkdot"], 3.0 * pk)
    out["loss"].backward()
    assert batch.teacher_z.grad is None and batch.student_z.grad is not None


def test_sums_with_none_duplicates_or_unknown_terms_are_refused_naming_the_field() -> None:
    for bad, why in (("kd+none", "'none' cannot"), ("kd+kd", "repeats"), ("kd+pkdto", "'pkdto'")):
        with pytest.raises(ConfigError, match="distill.losses") as info:
            load_config(overrides={"distill.losses": ["none", bad]})
        assert why in str(info.value) and "none, kd, fitnet" in str(info.value)
        with pytest.raises(ConfigError, match=why):
            build_loss(bad, **DIMS)
    with pytest.raises(ConfigError, match="duplicates"):
        load_config(overrides={"distill.losses": ["kd+pkdot", "pkdot+kd"]})
    cfg = load_config(overrides={"distill.losses": ["none", "kd+pkdot-most", "pkdot+crd+sp"]})
    assert cfg.distill.losses == ["none", "kd+pkdot-most", "pkdot+crd+sp"]


def test_the_structure_faithful_variants_are_pkdot_with_their_own_options(make_batch) -> None:
    cfg = load_config(overrides={"distill.pkdot-most.k": 6, "distill.pkdot-all.weight": 0.3})
    assert (cfg.distill.options("pkdot-most").anchors, cfg.distill.options("pkdot-most").k) == ("most", 6)
    assert cfg.distill.options("pkdot-all").k == "all" and cfg.distill.weight("pkdot-all") == 0.3
    assert cfg.distill.pkdot.anchors == "least" and "distill.pkdot-most.k" in cfg.flat()
    batch = make_batch()
    for name, kwargs in (("pkdot-most", {"k": 6, "anchors": "most"}), ("pkdot-all", {"k": "all"})):
        value = build_loss(name, **DIMS, options=cfg.distill.options(name))(batch)
        torch.testing.assert_close(value, pkdot_loss(batch.student_z, batch.teacher_z, **kwargs))
