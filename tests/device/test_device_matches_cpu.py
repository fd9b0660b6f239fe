"""The GPU check (``scripts/gpu_check.sh``): each numerical piece on the accelerator against the CPU,
with the tolerances stated here, and the commands end to end on it. The device is
``CROSSLING_CHECK_DEVICE`` (default ``cuda``); the CPU suite runs these same tests with ``cpu`` so the
check's own code cannot rot before a GPU comes (``tests/test_gpu_check.py``).

Float32 on CUDA means float32 here: TF32 is switched off, so differences are reduction order only.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))

from helpers import cli_env, make_tiny_model, random_batch, tiny_fit_args  # noqa: E402

from callbacks.head_importance import compute_head_importance  # noqa: E402
from callbacks.sketching import SketchOptions, sketch_batch  # noqa: E402
from lightning_modules.gates import HeadGates  # noqa: E402
from lightning_modules.precision import native_bf16_on, resolve_trainer_precision  # noqa: E402

DEVICE = torch.device(os.environ.get("CROSSLING_CHECK_DEVICE", "cuda"))
ACCELERATOR = "gpu" if DEVICE.type == "cuda" else DEVICE.type
# float32 on both sides, different kernels and reduction orders
LOGITS_ATOL, IMPORTANCE_RTOL, SKETCH_COSINE = 1e-5, 1e-4, 0.99999
# a bfloat16 sketch pass against float32's (0.9999 on AVX-512 CPUs; docs/measurements.md, "Which projection")
BF16_SKETCH_COSINE = 0.99


@pytest.fixture(scope="module", autouse=True)
def exact_float32():
    if DEVICE.type == "cuda":
        if not torch.cuda.is_available():
            pytest.fail(f"CROSSLING_CHECK_DEVICE={DEVICE}, but torch {torch.__version__} sees no CUDA device")
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    yield


def _batch(seed: int = 0, size: int = 6, labels: int = 3) -> dict:
    ids, attention = random_batch(batch=size, length=14, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    return {"input_ids": ids, "attention_mask": attention, "labels": torch.randint(0, labels, (size,), generator=g)}


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def _logits(model, gates, batch, mask):
    with torch.no_grad(), gates.applied(mask):
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def test_head_gates_on_the_device_match_the_cpu_and_all_ones_changes_nothing():
    cpu_model, dev_model = make_tiny_model(), make_tiny_model().to(DEVICE)
    cpu_gates, dev_gates = HeadGates(cpu_model), HeadGates(dev_model)
    batch = _batch()
    g = torch.Generator().manual_seed(3)
    mask = (torch.rand(cpu_gates.shape, generator=g) > 0.4).float()
    ones = torch.ones(cpu_gates.shape)
    plain = _logits(dev_model, dev_gates, _to(batch, DEVICE), None)
    assert torch.equal(_logits(dev_model, dev_gates, _to(batch, DEVICE), ones.to(DEVICE)), plain)
    for m in (None, mask):
        on_cpu = _logits(cpu_model, cpu_gates, batch, m)
        on_dev = _logits(dev_model, dev_gates, _to(batch, DEVICE), None if m is None else m.to(DEVICE)).cpu()
        assert torch.allclose(on_dev, on_cpu, atol=LOGITS_ATOL, rtol=0), (on_dev - on_cpu).abs().max()


def test_head_importance_on_the_device_matches_the_cpu():
    batches = [_batch(seed) for seed in range(3)]
    on_cpu = compute_head_importance(make_tiny_model(), batches)
    on_dev = compute_head_importance(make_tiny_model().to(DEVICE), [_to(b, DEVICE) for b in batches])
    assert on_dev.device.type == "cpu" and on_dev.dtype == torch.float64
    assert torch.allclose(on_dev, on_cpu, rtol=IMPORTANCE_RTOL, atol=1e-8), (on_dev - on_cpu).abs().max()


def _cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a.double(), b.double(), dim=1)


def test_sketches_on_the_device_match_the_cpu_under_a_head_mask():
    batch = _batch(5)
    options = SketchOptions(k=8, pairs=2, precision="32")
    cpu_model, dev_model = make_tiny_model(), make_tiny_model().to(DEVICE)
    cpu_gates, dev_gates = HeadGates(cpu_model), HeadGates(dev_model)
    mask = torch.ones(cpu_gates.shape)
    mask[1, 2] = mask[0, 0] = 0
    s_cpu, loss_cpu, pred_cpu = sketch_batch(cpu_model, cpu_gates, batch, mask, options)
    s_dev, loss_dev, pred_dev = sketch_batch(dev_model, dev_gates, _to(batch, DEVICE), mask.to(DEVICE), options)
    assert _cosines(s_dev.cpu(), s_cpu).min() > SKETCH_COSINE
    assert torch.allclose(loss_dev.cpu(), loss_cpu, atol=1e-5) and torch.equal(pred_dev.cpu(), pred_cpu)


def test_precision_auto_on_the_device_and_its_bf16_sketches():
    native, reason = native_bf16_on(DEVICE.type)
    choice = resolve_trainer_precision("auto", DEVICE.type)
    assert choice.precision == ("bf16-mixed" if native else "32-true"), choice
    if DEVICE.type == "cuda":
        major, _ = torch.cuda.get_device_capability()
        assert native is (major >= 8), reason
    if not native:
        return
    model = make_tiny_model().to(DEVICE)
    batch = _to(_batch(7), DEVICE)
    full, *_ = sketch_batch(model, None, batch, None, SketchOptions(k=8, precision="32"))
    half, *_ = sketch_batch(model, None, batch, None, SketchOptions(k=8, precision="bf16"))
    assert _cosines(half.cpu(), full.cpu()).min() > BF16_SKETCH_COSINE


def _crossling(args: list[str], **env: str) -> subprocess.CompletedProcess:
    environment = cli_env(**env)
    environment.pop("CUDA_VISIBLE_DEVICES", None) if DEVICE.type == "cuda" else None
    done = subprocess.run([sys.executable, "-m", "lightning_modules.main", *args], cwd=REPO, env=environment,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (args, done.stdout[-2000:], done.stderr[-4000:])
    return done


def test_a_tiny_fit_and_its_analysis_run_on_the_device_and_rank_as_the_cpu_does(tmp_path):
    """The fit trains on the device (auto precision); its checkpoint, analysed once on the CPU and once on
    the device (sketch, influence, fidelity, report), gives the same sketches and the same rankings."""
    run = tmp_path / "run"
    _crossling(tiny_fit_args(run, "--trainer.accelerator", ACCELERATOR, "--trainer.precision", "auto"))
    assert sorted(p.name for p in (run / "checkpoints").glob("epoch=*.ckpt")) == ["epoch=0.ckpt", "epoch=1.ckpt"]
    data = tiny_fit_args(run)[tiny_fit_args(run).index("--data.class_path"):][:14]  # the fit's data options
    common = ["analyze", "--config", str(REPO / "configs/demo/pawsx-analyze.yaml"), "--model.backbone=tiny-random",
              *data, "--conditions=[full]", "--sketch.k=8", "--sketch.precision=32", "--influence.m=5",
              "--influence.bootstrap_resamples=20", "--fidelity.n_test=4", "--fidelity.n_train=16",
              "--trainer.enable_progress_bar=false"]
    results = {}
    for side, accelerator in (("cpu", "cpu"), ("device", ACCELERATOR)):
        where = tmp_path / f"analysis-{side}"
        where.mkdir()
        (where / "checkpoints").symlink_to(run / "checkpoints")
        _crossling([*common, f"--trainer.default_root_dir={where}", f"--trainer.accelerator={accelerator}",
                    "--stages=[sketch, influence, fidelity, report]"])
        results[side] = where
    cpu, dev = results["cpu"], results["device"]
    for split in ("train", "test"):
        a = np.load(next(cpu.glob(f"sketches/epoch=1/full/{split}.npy")))
        b = np.load(next(dev.glob(f"sketches/epoch=1/full/{split}.npy")))
        assert _cosines(torch.from_numpy(b), torch.from_numpy(a)).min() > SKETCH_COSINE, split
    top_cpu = np.load(cpu / "influence/full/topk.npz")["pos_idx"]
    top_dev = np.load(dev / "influence/full/topk.npz")["pos_idx"]
    overlap = np.mean([len(set(x) & set(y)) / len(x) for x, y in zip(top_cpu, top_dev, strict=True)])
    assert overlap > 0.95, overlap  # ties aside, the same top sets
    assert (dev / "fidelity/fidelity.json").is_file() and (dev / "report/report.md").is_file()
