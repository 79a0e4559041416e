"""Registry, base-class checks and the total loss (pkdot/distill/base.py and the package's import list)."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from pkdot import config
from pkdot.config import DistillConfig, LossOptions, RKDOptions, SPOptions
from pkdot.distill import DistillLoss, available_losses, build_loss, register, total_loss
from pkdot.distill import base as distill_base
from pkdot.errors import ConfigError, StageError

EXPECTED = {"none", "kd", "fitnet", "sp", "rkd", "pkt", "crd", "pkdot", "pkdot-most", "pkdot-all"}


def _build(name: str, cfg: DistillConfig, regression: bool = False, **options) -> DistillLoss:
    return build_loss(
        name,
        student_dim=12,
        teacher_dim=20,
        num_outputs=1 if regression else 3,
        regression=regression,
        num_samples=50,
        options=cfg.options(name).model_copy(update=options),
    )


def test_the_registry_is_exactly_the_configs_list_of_losses() -> None:
    assert set(available_losses()) == set(config.LOSSES) == EXPECTED
    assert available_losses() == sorted(available_losses())
    assert DistillConfig().losses == [n for n in config.LOSSES if n not in ("pkdot-most", "pkdot-all")]


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


def test_unknown_name_lists_the_available_losses() -> None:
    with pytest.raises(ConfigError, match="unknown loss 'ot'") as info:
        build_loss("ot", student_dim=12, teacher_dim=20, num_outputs=3, regression=False, num_samples=50)
    for name in EXPECTED:
        assert name in str(info.value)


def test_options_are_typed_per_loss_and_reach_the_class(make_batch) -> None:
    with pytest.raises(ValidationError, match="alpha"):
        SPOptions(alpha=1.0)
    with pytest.raises(ConfigError, match="options must be a SPOptions"):
        build_loss(
            "sp",
            student_dim=12,
            teacher_dim=20,
            num_outputs=3,
            regression=False,
            num_samples=5,
            options=RKDOptions(),
        )
    batch = make_batch()
    from pkdot.distill.rkd import rkd_loss

    cfg = DistillConfig(rkd={"distance_weight": 0.0, "angle_weight": 2.0})
    loss = _build("rkd", cfg)
    assert loss.options == {"distance_weight": 0.0, "angle_weight": 2.0}
    assert loss(batch).item() == pytest.approx(
        rkd_loss(batch.student_z, batch.teacher_z, distance_weight=0.0, angle_weight=2.0).item()
    )
    # with no options, the defaults of the loss's section
    default = build_loss(
        "rkd", student_dim=12, teacher_dim=20, num_outputs=3, regression=False, num_samples=5
    )
    assert default.options == {"distance_weight": 25.0, "angle_weight": 50.0}


def test_bad_dimensions_and_batches(make_batch, distill_cfg) -> None:
    with pytest.raises(ConfigError, match="student_dim"):
        build_loss("sp", student_dim=0, teacher_dim=20, num_outputs=3, regression=False, num_samples=5)
    with pytest.raises(TypeError, match="teacher_dim"):
        build_loss("sp", student_dim=12)  # type: ignore[call-arg]
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


def test_total_loss_weights_each_term_and_returns_them_separately() -> None:
    cfg = DistillConfig(pkdot={"weight": 0.2}, task_weight=0.8)
    task, distill = torch.tensor(2.0), torch.tensor(5.0)
    parts = total_loss(task, distill, cfg, "pkdot")
    assert set(parts) == {"loss", "loss_task", "loss_pkdot"}
    assert parts["loss"].item() == pytest.approx(0.8 * 2.0 + 0.2 * 5.0)
    assert parts["loss_task"].item() == pytest.approx(0.8 * 2.0)
    assert parts["loss_pkdot"].item() == pytest.approx(0.2 * 5.0)
    # A loss not named in cfg.weights uses its class's default weight.
    sp = total_loss(task, distill, cfg, "sp")
    assert set(sp) == {"loss", "loss_task", "loss_sp"}
    assert sp["loss_sp"].item() == pytest.approx(3000.0 * 5.0)
    with pytest.raises(StageError, match="scalar"):
        total_loss(torch.ones(3), distill, cfg, "pkdot")
    with pytest.raises(ConfigError, match="unknown loss 'ot'"):
        total_loss(task, distill, cfg, "ot")


def test_a_new_loss_is_an_options_section_and_one_decorated_class(monkeypatch, make_batch) -> None:
    """Registering a name outside config.LOSSES is refused; once the config lists it, one class suffices."""

    class MeanGapOptions(LossOptions):
        scale: float = 1.0

    class MeanGap(DistillLoss):
        def __init__(self, *, scale: float, **dims) -> None:
            super().__init__(**dims)
            self.scale = scale

        def compute(self, batch):
            return self.scale * (batch.student_z.mean() - batch.teacher_z.mean()).abs()

    with pytest.raises(ConfigError, match="not a loss of pkdot.config.LOSSES"):
        register("mean-gap")(MeanGap)
    monkeypatch.setitem(config.LOSSES, "mean-gap", MeanGapOptions)
    monkeypatch.setitem(distill_base._REGISTRY, "mean-gap", MeanGap)  # restored (removed) after the test
    register("mean-gap")(MeanGap)
    batch = make_batch()
    value = build_loss(
        "mean-gap",
        student_dim=12,
        teacher_dim=20,
        num_outputs=3,
        regression=False,
        num_samples=50,
        options=MeanGapOptions(scale=2.0),
    )(batch)
    assert value.item() == pytest.approx(2.0 * (batch.student_z.mean() - batch.teacher_z.mean()).abs().item())


def test_register_rejects_a_taken_name_and_non_losses() -> None:
    with pytest.raises(ConfigError, match="already used"):

        @register("sp")
        class OtherSP(DistillLoss):
            pass

    with pytest.raises(ConfigError, match="not a DistillLoss"):
        register("sp")(int)  # type: ignore[arg-type]
    assert available_losses() == sorted(EXPECTED)
