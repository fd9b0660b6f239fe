"""A 2-process CPU DDP sketch run (strategy ddp, gloo) writes the same files as one process:
per-rank shards carry their dataset indices and are merged row by row into one file.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
from helpers import REPO, cli_env, small_pawsx_datamodule
from test_sketch_store import make_run_dir, run_stage

from analysis.sketch_store import list_sketches, load_sketches

SCRIPT = """
import sys
from pathlib import Path

import torch
from pytorch_lightning import Trainer

from lightning_modules.stages.sketch import sketch_checkpoints
from callbacks.sketching import SketchOptions
from datamodules import PAWSXDataModule
from lightning_modules.classifier import SequenceClassifier

torch.set_num_threads(1)
run_dir = Path(sys.argv[1])
dm = PAWSXDataModule(languages=["en", "de"], train_per_language=24, dev_per_language=8, test_per_language=8,
                     batch_size=4, eval_batch_size=8, backbone="tiny-random", seed=3)
module = SequenceClassifier(backbone="tiny-random", languages=dm.languages, init_seed=9)
trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                  inference_mode=False)
paths = sketch_checkpoints(trainer, module, dm, run_dir, ["own"], SketchOptions(k=4, seed=3, precision="32"))
print(f"rank {trainer.global_rank} of {trainer.world_size}: {len(paths)} files")
"""


def test_two_process_ddp_writes_the_single_process_file(tmp_path):
    dm = small_pawsx_datamodule(languages=["en", "de"])
    single = make_run_dir(tmp_path / "single", dm.languages, epochs=1)
    ddp = tmp_path / "ddp"
    shutil.copytree(single / "checkpoints", ddp / "checkpoints")
    shutil.copytree(single / "subnetworks", ddp / "subnetworks")
    script = tmp_path / "sketch_ddp.py"
    script.write_text(SCRIPT)
    # Lightning's launcher starts rank 1 from rank 0, as for a user's `--trainer.strategy ddp`
    proc = subprocess.Popen(
        [sys.executable, str(script), str(ddp)],
        cwd=REPO,
        env=cli_env(),
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        run_stage(single, dm, conditions=["own"])  # the single-process reference, meanwhile
        stdout, stderr = proc.communicate(timeout=240)
    finally:
        proc.kill()
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    assert "rank 0 of 2: 4 files" in stdout and "rank 1 of 2: 4 files" in stdout, stdout
    keys = list_sketches(single)  # en and de masks x train and test; the test pass writes both masks' files
    assert len(keys) == 4 and list_sketches(ddp) == keys
    assert not list(ddp.glob("sketches/**/*partial*"))  # shards merged and removed
    for key in keys:
        a, side_a = load_sketches(single, *key)
        b, side_b = load_sketches(ddp, *key)
        # each rank saw other batch compositions (other padding), so rounding may differ slightly
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6, err_msg=str(key))
        np.testing.assert_allclose(side_b.pop("loss"), side_a.pop("loss"), rtol=1e-5, atol=1e-6)
        assert json.dumps(side_b, sort_keys=True) == json.dumps(side_a, sort_keys=True), key
