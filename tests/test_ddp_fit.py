"""A real 2-process CPU DDP fit (gloo) with language-homogeneous batches: the same run-directory
layout as one process, every step on the same language on both ranks (recorded on each rank
by ``helpers.RecordLanguages``), batches exactly those of the sampler, and validation metrics
reduced over the ranks' shards equal to a one-process evaluation.

``scripts/gpu_check.sh`` runs this file on the GPUs of a node (``CROSSLING_CHECK_DEVICE=cuda``,
``CROSSLING_DDP_WORLD`` = their number, NCCL); here it runs on 2 CPU processes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from helpers import build_data, dev_accuracy, logged_val_rows, run_config, run_crossling, tiny_fit_args

from callbacks.checkpoints import list_checkpoints, load_checkpoint
from datamodules.samplers import LanguageBatchSampler

WORLD = int(os.environ.get("CROSSLING_DDP_WORLD", "2"))
ACCELERATOR = "gpu" if os.environ.get("CROSSLING_CHECK_DEVICE") == "cuda" else "cpu"
STEPS = 3


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("ddp") / "run"
    args = tiny_fit_args(
        run_dir,
        "--trainer.strategy",
        "ddp",
        "--trainer.accelerator",
        ACCELERATOR,
        "--trainer.devices",
        str(WORLD),
        "--trainer.limit_train_batches",
        str(STEPS),
        "--data.init_args.batching",
        "language",
        "--trainer.callbacks+=tests.helpers.RecordLanguages",
        f"--trainer.callbacks.out_dir={run_dir / 'steps'}",
    )
    result = run_crossling(args, timeout=400)
    assert result.returncode == 0, result.stderr[-4000:]
    return run_dir


def recorded(run_dir: Path) -> list[list[dict]]:
    per_rank = []
    for rank in range(WORLD):
        data = json.loads((run_dir / "steps" / f"rank{rank}.json").read_text())
        assert data["world_size"] == WORLD
        per_rank.append(data["steps"])
    return per_rank


def test_ddp_writes_the_run_directory_layout(ddp_run):
    assert [epoch for epoch, _ in list_checkpoints(ddp_run)] == [0, 1]
    assert not (ddp_run / "checkpoints" / "last.ckpt").exists()  # a finished fit drops its resume state
    assert (ddp_run / "config.yaml").is_file()
    config = run_config(ddp_run)
    assert config["trainer"]["strategy"] == "ddp"
    for epoch, path in list_checkpoints(ddp_run):
        meta = load_checkpoint(path)["crossling"]
        # a global step counts optimizer steps, which both ranks take together
        assert meta["epoch"] == epoch and meta["global_step"] == STEPS * (epoch + 1)
    languages = build_data(config).languages
    rows = logged_val_rows(ddp_run)
    assert [int(r["epoch"]) for r in rows] == [0, 1]
    assert all(f"val/acc_{lang}" in rows[0] for lang in languages)


def test_every_step_has_one_language_on_all_ranks(ddp_run):
    per_rank = recorded(ddp_run)
    assert len(per_rank[0]) == len(per_rank[1]) == 2 * STEPS
    for steps in zip(*per_rank):
        assert len({(s["epoch"], s["batch_idx"]) for s in steps}) == 1
        langs = {lang for s in steps for lang in s["langs"]}
        assert len(langs) == 1, f"step {steps[0]['epoch']}/{steps[0]['batch_idx']}: languages {langs}"
        indices = [i for s in steps for i in s["indices"]]
        assert len(indices) == len(set(indices)), "ranks share an example in one step"


def test_batches_are_the_samplers_and_change_with_the_epoch(ddp_run):
    config = run_config(ddp_run)
    data = build_data(config)
    init = config["data"]["init_args"]
    langs = [e.lang for e in data.dataset("train").examples]
    per_rank = recorded(ddp_run)
    for rank, steps in enumerate(per_rank):
        for epoch in (0, 1):
            sampler = LanguageBatchSampler(langs, init["batch_size"], init["seed"], WORLD, rank)
            sampler.set_epoch(epoch)
            expected = list(sampler)[:STEPS]
            assert [s["indices"] for s in steps if s["epoch"] == epoch] == expected
    epoch0 = [s["indices"] for s in per_rank[0] if s["epoch"] == 0]
    epoch1 = [s["indices"] for s in per_rank[0] if s["epoch"] == 1]
    assert epoch0 != epoch1


def test_sharded_validation_equals_one_process_evaluation(ddp_run):
    rows = logged_val_rows(ddp_run)
    for epoch in (0, 1):
        for lang, acc in dev_accuracy(ddp_run, epoch).items():
            assert float(rows[epoch][f"val/acc_{lang}"]) == pytest.approx(acc, abs=1e-6), (epoch, lang)
