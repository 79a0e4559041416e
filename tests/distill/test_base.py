"""Registry, base-class checks and the total loss (pkdot/distill/base.py and the package's auto-import)."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch

from pkdot.config import DistillConfig
from pkdot.distill import DistillLoss, available_losses, build_loss, default_weights, register, total_loss
from pkdot.distill import base as distill_base
from pkdot.errors import ConfigError, StageError

EXPECTED = {"none", "kd", "fitnet", "sp", "rkd", "pkt", "crd", "pkdot"}


def _build(name: str, cfg: DistillConfig, regression: bool = False, **options) -> DistillLoss:
    return build_loss(
        name,
        student_dim=12,
        teacher_dim=20,
        num_outputs=1 if regression else 3,
        regression=regression,
        num_samples=50,
        cfg=cfg,
        **options,
    )


def test_importing_the_package_registers_every_loss() -> None:
    assert EXPECTED <= set(available_losses())
    assert available_losses() == sorted(available_losses())


@pytest.mark.parametrize("name", sorted(EXPECTED))
@pytest.mark.parametrize("regression", [False, True])
def test_every_loss_builds_runs_and_never_reaches_the_teacher(
    name, regression, make_batch, distill_cfg
) -> None:
    loss = _build(name, distill_cfg, regression=regression)
    assert isinstance(loss, DistillLoss) and loss.name == name
    batch = make_batch(num_outputs=1 if regression else 3, regression=regression)
    value = loss(batch)
    assert value.dim() == 0 and torch.isfinite(value)
    if name == "none":
        assert value.item() == 0.0
        return
    assert value.item() > 0
    task = torch.nn.functional.mse_loss(batch.student_logits, torch.zeros_like(batch.student_logits))
    total_loss(task, value, distill_cfg, name)["loss"].backward()
    assert batch.teacher_z.grad is None and batch.teacher_logits.grad is None
    grads = [g for g in (batch.student_z.grad, batch.student_logits.grad) if g is not None]
    assert grads and any(float(g.abs().sum()) > 0 for g in grads)


def test_unknown_name_lists_the_available_losses(distill_cfg) -> None:
    with pytest.raises(ConfigError, match="unknown loss 'ot'") as info:
        _build("ot", distill_cfg)
    for name in EXPECTED:
        assert name in str(info.value)


def test_options_unknown_rejected_and_config_options_applied(make_batch) -> None:
    with pytest.raises(ConfigError, match=r"distill.options.sp: unknown option\(s\) \['alpha'\]"):
        _build("sp", DistillConfig(), alpha=1.0)
    cfg = DistillConfig(options={"rkd": {"distance_weight": 0.0, "angle_weight": 1.0}})
    batch = make_batch()
    from pkdot.distill.rkd import rkd_angle_loss

    assert _build("rkd", cfg)(batch).item() == pytest.approx(
        rkd_angle_loss(batch.student_z, batch.teacher_z).item()
    )
    # An explicit keyword wins over cfg.options.
    assert _build("rkd", cfg, angle_weight=2.0)(batch).item() == pytest.approx(
        2.0 * rkd_angle_loss(batch.student_z, batch.teacher_z).item()
    )


def test_bad_dimensions_and_batches(make_batch, distill_cfg) -> None:
    with pytest.raises(ConfigError, match="student_dim"):
        build_loss(
            "sp",
            student_dim=0,
            teacher_dim=20,
            num_outputs=3,
            regression=False,
            num_samples=5,
            cfg=distill_cfg,
        )
    with pytest.raises(ConfigError, match="missing"):
        build_loss("sp", student_dim=12, cfg=distill_cfg)
    loss = _build("sp", distill_cfg)
    batch = make_batch(student_dim=7)
    with pytest.raises(StageError, match=r"student_z has shape \(16, 7\), expected \(B, 12\)"):
        loss(batch)
    batch = make_batch()
    batch.teacher_z = batch.teacher_z[:-1]
    with pytest.raises(StageError, match="teacher_z has 15 rows"):
        loss(batch)
    batch = make_batch()
    batch.labels = batch.labels[:3]
    with pytest.raises(StageError, match="labels"):
        loss(batch)


def test_total_loss_weights_each_term_and_returns_them_separately(distill_cfg) -> None:
    cfg = DistillConfig(weights={"pkdot": 0.2}, task_weight=0.8)
    task, distill = torch.tensor(2.0), torch.tensor(5.0)
    parts = total_loss(task, distill, cfg, "pkdot")
    assert set(parts) == {"loss", "loss_task", "loss_pkdot"}
    assert parts["loss"].item() == pytest.approx(0.8 * 2.0 + 0.2 * 5.0)
    assert parts["loss_task"].item() == pytest.approx(0.8 * 2.0)
    assert parts["loss_pkdot"].item() == pytest.approx(0.2 * 5.0)
    # A loss not named in cfg.weights uses its class's default weight.
    sp = total_loss(task, distill, cfg, "sp")
    assert set(sp) == {"loss", "loss_task", "loss_sp"}
    assert sp["loss_sp"].item() == pytest.approx(default_weights()["sp"] * 5.0)
    with pytest.raises(StageError, match="scalar"):
        total_loss(torch.ones(3), distill, cfg, "pkdot")
    with pytest.raises(ConfigError, match="distill loss 'ot' is not registered"):
        total_loss(task, distill, cfg, "ot")


def test_a_new_loss_is_one_file_with_one_decorator(tmp_path, make_batch, distill_cfg) -> None:
    """A package whose __init__ uses the same auto-import as pkdot.distill picks up a dropped-in file."""
    package = tmp_path / "extra_losses_pkg"
    package.mkdir()
    (package / "__init__.py").write_text(
        "from pkdot.distill import import_loss_modules\nimport_loss_modules(__path__, __name__)\n"
    )
    (package / "mean_gap.py").write_text(
        textwrap.dedent(
            """
            from pkdot.distill import DistillLoss, register

            @register("mean-gap")
            class MeanGap(DistillLoss):
                def compute(self, batch):
                    return (batch.student_z.mean() - batch.teacher_z.mean()).abs()
            """
        )
    )
    sys.path.insert(0, str(tmp_path))
    try:
        import extra_losses_pkg  # noqa: F401

        assert "mean-gap" in available_losses()
        batch = make_batch()
        value = _build("mean-gap", distill_cfg)(batch)
        assert value.item() == pytest.approx((batch.student_z.mean() - batch.teacher_z.mean()).abs().item())
    finally:
        sys.path.remove(str(tmp_path))
        distill_base._REGISTRY.pop("mean-gap", None)
        for mod in [m for m in sys.modules if m.startswith("extra_losses_pkg")]:
            del sys.modules[mod]


def test_register_rejects_a_taken_name_and_non_losses() -> None:
    with pytest.raises(ConfigError, match="already used"):

        @register("sp")
        class OtherSP(DistillLoss):
            pass

    with pytest.raises(ConfigError, match="not a DistillLoss"):
        register("thing")(int)  # type: ignore[arg-type]
    assert "thing" not in available_losses()
