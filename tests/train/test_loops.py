from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from pkdot.train.loops import FitState, epoch_batches, fit, seed_everything, task_loss, task_metric


def test_epoch_batches_cover_each_sample_once_and_split_by_rank():
    full = epoch_batches(50, 16, seed=1, epoch=0, drop_last=False)
    assert sorted(np.concatenate(full).tolist()) == list(range(50))
    r0 = epoch_batches(50, 16, seed=1, epoch=0, rank=0, world=2, drop_last=False)
    r1 = epoch_batches(50, 16, seed=1, epoch=0, rank=1, world=2, drop_last=False)
    for a, b, f in zip(r0, r1, full, strict=True):
        assert not set(a) & set(b)
        assert sorted([*a, *b]) == sorted(f)
    assert epoch_batches(50, 16, seed=1, epoch=1)[0].tolist() != full[0].tolist()
    assert epoch_batches(50, 16, seed=1, epoch=0)[0].tolist() == full[0].tolist()


def test_drop_last_removes_a_single_sample_batch():
    batches = epoch_batches(33, 16, seed=0, epoch=0)
    assert all(len(b) >= 2 for b in batches)


def test_task_loss_and_metric():
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    assert task_loss(logits, torch.tensor([0, 1]), False) < task_loss(logits, torch.tensor([1, 0]), False)
    assert task_metric(np.array([0, 1]), logits.numpy(), False) == 1.0
    out = torch.tensor([[0.5], [-0.5]])
    assert float(task_loss(out, torch.tensor([0.5, -0.5]), True)) == 0.0
    assert task_metric(np.array([0.5, -0.5]), out.numpy(), True) == pytest.approx(1.0)


def _problem(seed: int = 0):
    seed_everything(0)
    x = torch.randn(64, 5)
    y = (x[:, 0] > 0).long()
    seed_everything(seed)
    model = nn.Linear(5, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)

    def step(idx):
        return {"loss": nn.functional.cross_entropy(model(x[idx]), y[idx])}

    def validate():
        with torch.no_grad():
            return float((model(x).argmax(1) == y).float().mean())

    return model, opt, step, validate


def test_fit_learns_selects_best_and_records_history():
    model, opt, step, validate = _problem()
    state = fit(
        model,
        opt,
        train_step=step,
        validate=validate,
        epochs=6,
        batches_for_epoch=lambda e: epoch_batches(64, 16, seed=0, epoch=e),
    )
    assert len(state.history) == 6 and state.epoch == 6
    assert state.best_score == max(r["val_metric"] for r in state.history)
    assert state.best_score > 0.8
    assert validate() == pytest.approx(state.best_score)  # best weights restored


def test_fit_resumed_from_a_checkpoint_equals_an_uninterrupted_fit():
    model, opt, step, validate = _problem()
    full = fit(
        model,
        opt,
        train_step=step,
        validate=validate,
        epochs=5,
        batches_for_epoch=lambda e: epoch_batches(64, 16, seed=0, epoch=e),
    )
    final_full = {k: v.clone() for k, v in full.model_state.items()}

    model, opt, step, validate = _problem()
    saved: list[FitState] = []

    def keep(state: FitState) -> None:
        if state.epoch == 2:
            import copy

            saved.append(copy.deepcopy(state))
            raise KeyboardInterrupt  # simulated crash after epoch 2

    with pytest.raises(KeyboardInterrupt):
        fit(
            model,
            opt,
            train_step=step,
            validate=validate,
            epochs=5,
            batches_for_epoch=lambda e: epoch_batches(64, 16, seed=0, epoch=e),
            on_epoch_end=keep,
        )
    model, opt, step, validate = _problem(seed=123)  # fresh weights: everything must come from the checkpoint
    resumed = fit(
        model,
        opt,
        train_step=step,
        validate=validate,
        epochs=5,
        batches_for_epoch=lambda e: epoch_batches(64, 16, seed=0, epoch=e),
        resume=saved[0],
    )
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3, 4, 5]
    assert resumed.resumed_from == [2]
    for k, v in resumed.model_state.items():
        assert torch.allclose(v, final_full[k], atol=1e-6)


def test_group_batches_hold_one_group_each():
    from pkdot.train.loops import group_batches

    groups = np.repeat([0, 1, 2], [20, 13, 7])
    full = group_batches(groups, 8, seed=3, epoch=0, drop_last=False)
    assert sorted(np.concatenate(full).tolist()) == list(range(40))  # every sample once
    assert all(len(set(groups[b].tolist())) == 1 for b in full)
    assert len({int(groups[b[0]]) for b in full[:4]}) > 1  # groups are interleaved, not in blocks
    r0 = group_batches(groups, 8, seed=3, epoch=0, rank=0, world=2, drop_last=False)
    r1 = group_batches(groups, 8, seed=3, epoch=0, rank=1, world=2, drop_last=False)
    assert [np.concatenate([a, b]).tolist() for a, b in zip(r0, r1, strict=True)] == [
        b.tolist() for b in full
    ]
    assert group_batches(groups, 8, seed=3, epoch=1)[0].tolist() != full[0].tolist()
    dropped = group_batches(np.array([0] * 9 + [1]), 8, seed=0, epoch=0)
    assert [len(b) for b in dropped] == [8]  # a 1-sample group and a 1-sample tail are dropped


def test_too_few_samples_for_the_workers_is_a_clear_error():
    from pkdot.errors import StageError

    # 3 samples over 2 workers would give one worker a batch of 1 (which a batch-structure loss refuses)
    with pytest.raises(StageError, match="3 training samples cannot be split over train.num_workers = 2"):
        epoch_batches(3, 32, seed=0, epoch=0, rank=1, world=2)
    assert [len(b) for b in epoch_batches(4, 32, seed=0, epoch=0, rank=1, world=2)] == [2]
    assert [len(b) for b in epoch_batches(3, 32, seed=0, epoch=0)] == [3]
