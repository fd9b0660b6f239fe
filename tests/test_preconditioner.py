"""Adam's factored preconditioner against exact references: torch's own AdamW step, the explicitly formed
rank-one product, and the explicit Kronecker projection of the elementwise-scaled per-example gradient."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import make_tiny_model
from test_sketching import explicit_gradients, inputs, kron_projection, random_head_mask, tiny_float64

from callbacks.checkpoints import EpochCheckpoint, load_checkpoint
from callbacks.preconditioner import (
    adam_root_preconditioner,
    factor_adam_preconditioner,
    factor_cosine,
    preconditioner_scales,
    rank_one_factors,
)
from callbacks.sketching import Sketcher, SketchOptions
from lightning_modules.gates import HeadGates


def test_factors_of_a_rank_one_root_are_exact():
    g = torch.Generator().manual_seed(0)
    u, w = torch.rand(7, generator=g, dtype=torch.float64) + 0.1, torch.rand(5, generator=g, dtype=torch.float64) + 0.1
    root = torch.outer(u, w)
    a, b = rank_one_factors(root)
    torch.testing.assert_close(torch.outer(a, b), root, rtol=1e-12, atol=0)
    assert factor_cosine(root, a, b) == pytest.approx(1.0, abs=1e-12)


def test_factors_of_any_root_are_row_sums_times_column_sums_over_the_total():
    root = torch.rand(6, 9, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.05
    a, b = rank_one_factors(root)
    expected = root.numpy().sum(1)[:, None] * root.numpy().sum(0)[None, :] / root.numpy().sum()
    np.testing.assert_allclose(torch.outer(a, b).numpy(), expected, rtol=1e-12)
    formed = torch.outer(a, b).numpy().ravel()
    cosine = formed @ root.numpy().ravel() / np.linalg.norm(formed) / np.linalg.norm(root.numpy())
    assert factor_cosine(root, a, b) == pytest.approx(cosine, rel=1e-12)
    assert cosine < 1.0 - 1e-6  # a full-rank root is not kept whole: the fidelity can fall below 1


def test_root_preconditioner_squared_is_the_step_adamw_takes():
    """√P² · η · m̂ is exactly the update torch's AdamW applied (weight decay 0), at several steps."""
    torch.manual_seed(3)
    p = torch.nn.Parameter(torch.randn(4, 3, dtype=torch.float64))
    opt = torch.optim.AdamW([p], lr=0.01, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.0)
    for step in range(1, 5):
        before = p.detach().clone()
        p.grad = torch.randn(4, 3, dtype=torch.float64) * 10.0 ** (step - 2)
        opt.step()
        state, group = opt.state[p], opt.param_groups[0]
        m_hat = state["exp_avg"] / (1 - 0.8**step)
        step_taken = before - p.detach()
        root = adam_root_preconditioner(state, group)
        torch.testing.assert_close(0.01 * root.square() * m_hat, step_taken, rtol=1e-10, atol=1e-15)


def test_scaled_sketch_equals_projection_of_the_elementwise_scaled_explicit_gradient():
    model = tiny_float64(seed=4)
    batch = inputs(batch=3, length=9, seed=5)
    head_mask = random_head_mask(3, seed=6)
    options = SketchOptions(k=4, pairs=2, combine="concat", seed=7)
    plain = Sketcher(model, options)
    rng = np.random.default_rng(8)
    modules = dict(model.named_modules())
    scales = {n: (rng.uniform(0.1, 3.0, modules[n].out_features), rng.uniform(0.1, 3.0, modules[n].in_features + 1))
              for n in plain.names}
    scaled = Sketcher(model, options, scales=scales)
    gates = HeadGates(model)
    sketches, _, _ = scaled(model, gates, batch, head_mask)
    unscaled, _, _ = plain(model, gates, batch, head_mask)
    gates.remove()
    grads = explicit_gradients(model, batch, head_mask, plain.names)
    mats = kron_projection(model, plain.names, options)
    for e in range(3):
        expected = [m @ (torch.outer(*map(torch.as_tensor, scales[n])) * g).reshape(-1)
                    for m, g, n in zip(mats, grads[e], plain.names)]
        torch.testing.assert_close(sketches[e], torch.cat(expected), rtol=1e-9, atol=1e-12)
    assert not torch.allclose(sketches, unscaled)  # the scales changed the sketch


def test_scales_of_the_wrong_shape_are_refused_by_layer_name():
    model = make_tiny_model(1, 2, 8, 50, seed=0)
    names = Sketcher(model, SketchOptions(k=2, pairs=1)).names
    scales = {n: (np.ones(3), np.ones(3)) for n in names}
    sketcher = Sketcher(model, SketchOptions(k=2, pairs=1), scales=scales)
    with pytest.raises(ValueError, match=f"scales of layer {names[0]}"):
        sketcher.matrices(torch.device("cpu"), torch.float32)


def test_epoch_checkpoint_holds_the_factored_preconditioner_of_the_optimizer(tmp_path):
    import pytorch_lightning as pl

    from datamodules import PAWSXDataModule
    from lightning_modules.classifier import SequenceClassifier

    dm = PAWSXDataModule(languages=["en", "ko"], train_per_language=12, dev_per_language=4, test_per_language=4,
                         batch_size=4, eval_batch_size=4, backbone="tiny-random")
    module = SequenceClassifier(backbone="tiny-random", languages=dm.languages)
    trainer = pl.Trainer(
        max_epochs=2, limit_val_batches=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
        default_root_dir=str(tmp_path), callbacks=[EpochCheckpoint(save_last=False)],
    )  # fmt: skip
    trainer.fit(module, datamodule=dm)
    record = load_checkpoint(tmp_path / "checkpoints" / "epoch=1.ckpt")["adam"]
    optimizer = trainer.optimizers[0]
    assert record["step"] == 12  # 2 × 12 examples in batches of 4, two epochs
    linears = [n for n, m in module.model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert sorted(record["layers"]) == sorted(linears)
    groups = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    scales = preconditioner_scales(record, linears)
    for name in linears:
        mod = dict(module.model.named_modules())[name]
        explicit = []  # √P written out from the optimizer's state, bias as the last column
        for p in (mod.weight, mod.bias):
            g = groups[id(p)]
            v_hat = optimizer.state[p]["exp_avg_sq"].double() / (1 - g["betas"][1] ** 12)
            explicit.append((1.0 / (v_hat.sqrt() + g["eps"])).sqrt().reshape(mod.out_features, -1))
        root = torch.cat(explicit, dim=1).numpy()
        a, b = scales[name]
        expected = root.sum(1)[:, None] * root.sum(0)[None, :] / root.sum()
        np.testing.assert_allclose(np.outer(a, b), expected, rtol=2e-6)
        formed = np.outer(a, b).ravel()
        cosine = formed @ root.ravel() / np.linalg.norm(formed) / np.linalg.norm(root)
        assert record["layers"][name]["fidelity"] == pytest.approx(cosine, abs=1e-6)


def test_no_adam_state_gives_no_record_and_a_clear_error_for_scales():
    model = make_tiny_model(1, 2, 8, 50, seed=0)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    assert factor_adam_preconditioner(sgd, model) is None
    fresh = torch.optim.AdamW(model.parameters())  # no step taken: no second moments yet
    assert factor_adam_preconditioner(fresh, model) is None
    with pytest.raises(ValueError, match="no Adam preconditioner"):
        preconditioner_scales(None, ["x"])
