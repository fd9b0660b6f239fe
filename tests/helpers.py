"""Helpers shared by the tests and by the ``crossling`` subprocesses they start (this module is
importable as ``tests.helpers`` from the repository root, so a run can load ``RecordLanguages``
with ``--trainer.callbacks``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytorch_lightning as pl
import torch

REPO = Path(__file__).resolve().parent.parent

SMALL_PAWSX = dict(
    train_per_language=24,
    dev_per_language=8,
    test_per_language=8,
    batch_size=4,
    eval_batch_size=8,
    backbone="tiny-random",
    seed=3,
)


def load_script(name: str):
    """A script under ``scripts/`` as a module (its dataclasses look their module up in sys.modules)."""
    import importlib.util

    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def small_pawsx_datamodule(**overrides):
    """A small PAWS-X datamodule on the bundled data (tiny tokenizer); ``overrides`` change its options."""
    import lightning_modules  # noqa: F401  (registers the tiny backbone's tokenizer)
    from datamodules import PAWSXDataModule

    return PAWSXDataModule(**{**SMALL_PAWSX, **overrides})


def cpu_trainer(**extra) -> pl.Trainer:
    """A quiet one-process CPU trainer; crossling shards data itself, so no distributed sampler."""
    options = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )
    return pl.Trainer(**{**options, **extra})


def make_tiny_model(
    layers: int = 3,
    heads: int = 4,
    hidden: int = 32,
    vocab: int = 100,
    attn: str = "eager",
    seed: int = 0,
    num_labels: int = 3,
    init_std: float = 0.02,
    layout: str = "xlmr",
):
    """A randomly initialised classifier of any size, in eval mode (no dropout), in XLM-R's layout
    (``roberta.*``, tanh head ``classifier.dense`` + ``out_proj``) or BERT's (``bert.*``, as
    multilingual-e5 and mBERT: ``bert.pooler.dense`` + ``classifier``)."""
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        XLMRobertaConfig,
        XLMRobertaForSequenceClassification,
    )

    config = XLMRobertaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=2 * hidden,
        max_position_embeddings=64,
        type_vocab_size=1,
        pad_token_id=1,
        num_labels=num_labels,
        initializer_range=init_std,
    )
    if layout == "bert":
        config = BertConfig(**{**config.to_dict(), "type_vocab_size": 2})
    elif layout != "xlmr":
        raise ValueError(f"layout must be 'xlmr' or 'bert', found {layout!r}")
    config._attn_implementation = attn
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = (BertForSequenceClassification if layout == "bert" else XLMRobertaForSequenceClassification)(config)
    return model.eval()


LAYOUTS = ("xlmr", "bert")


def random_batch(batch: int = 4, length: int = 12, vocab: int = 100, seed: int = 0):
    """Random token ids (never the pad id) with a random amount of right padding per row."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (batch, length), generator=g)
    lengths = torch.randint(length // 2, length + 1, (batch,), generator=g)
    lengths[0] = length  # at least one row unpadded
    attention = (torch.arange(length)[None, :] < lengths[:, None]).long()
    ids[attention == 0] = 1
    ids[:, 0] = 0
    return ids, attention


def cli_env(**extra: str) -> dict[str, str]:
    """Environment for ``crossling`` subprocesses: one thread, tests/ importable, no network."""
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
        HF_HUB_OFFLINE="1",
        WANDB_MODE="disabled",
        PYTHONWARNINGS="ignore",
    )
    env.update(extra)
    return env


def run_crossling(
    args: list[str], console_script: bool = False, timeout: int = 300, **env: str
) -> subprocess.CompletedProcess:
    """Run ``crossling <args>`` (the console script, or ``python -m lightning_modules.main``)."""
    if console_script:
        command = [str(Path(sys.executable).parent / "crossling"), *args]
    else:
        command = [sys.executable, "-m", "lightning_modules.main", *args]
    return subprocess.run(
        command, cwd=REPO, env=cli_env(**env), capture_output=True, text=True, timeout=timeout
    )


def tiny_fit_args(run_dir: Path, *extra: str) -> list[str]:
    """``crossling fit`` arguments for a run of a few batches on tiny-random and bundled PAWS-X."""
    return [
        "fit",
        "--model.backbone",
        "tiny-random",
        "--data.class_path",
        "datamodules.PAWSXDataModule",
        "--data.init_args.train_per_language",
        "16",
        "--data.init_args.dev_per_language",
        "8",
        "--data.init_args.test_per_language",
        "8",
        "--data.init_args.batch_size",
        "4",
        "--data.init_args.eval_batch_size",
        "16",
        "--data.init_args.max_length",
        "48",
        "--trainer.limit_train_batches",
        "2",
        "--trainer.limit_val_batches",
        "3",
        "--trainer.max_epochs",
        "2",
        "--trainer.num_sanity_val_steps",
        "0",
        "--trainer.accelerator",
        "cpu",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.enable_model_summary",
        "false",
        "--trainer.default_root_dir",
        str(run_dir),
        *extra,
    ]


class RecordLanguages(pl.Callback):
    """Record, on every rank, the languages and dataset indices of each training batch, and
    write them to ``<out_dir>/rank<R>.json`` at the end of fit (for the DDP alignment test).

    Args:
        out_dir: folder for the per-rank files.
    """

    def __init__(self, out_dir: str):
        self.out_dir = out_dir
        self.steps: list[dict] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.steps.append(
            {
                "epoch": trainer.current_epoch,
                "batch_idx": batch_idx,
                "langs": batch["langs"].tolist(),
                "indices": batch["indices"].tolist(),
            }
        )

    def on_fit_end(self, trainer, pl_module) -> None:
        out = Path(self.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"rank{trainer.global_rank}.json"
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({"world_size": trainer.world_size, "steps": self.steps}))
        os.replace(tmp, path)


def run_config(run_dir: Path) -> dict:
    import yaml

    return yaml.safe_load((Path(run_dir) / "config.yaml").read_text())


def build_data(config: dict):
    """A run's datamodule, rebuilt from its own config.yaml."""
    import importlib

    module, _, name = config["data"]["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    return cls(**{**config["data"]["init_args"], "backbone": config["model"]["backbone"]})


def dev_accuracy(run_dir: Path, epoch: int) -> dict[str, float]:
    """Reference for the logged val/acc_<lang>: that epoch's weights on the whole dev split, one process."""
    from callbacks.checkpoints import load_checkpoint
    from lightning_modules.classifier import SequenceClassifier

    data = build_data(run_config(run_dir))
    payload = load_checkpoint(Path(run_dir) / "checkpoints" / f"epoch={epoch}.ckpt")
    module = SequenceClassifier(**payload["crossling"]["hparams"])
    module.load_state_dict(payload["state_dict"])
    module.eval()
    correct: dict[int, list[bool]] = {}
    with torch.no_grad():
        for batch in data.eval_dataloader("dev"):
            preds = module(batch["input_ids"], batch["attention_mask"]).argmax(-1)
            for lang, ok in zip(batch["langs"].tolist(), (preds == batch["labels"]).tolist()):
                correct.setdefault(lang, []).append(ok)
    return {lang: sum(correct[i]) / len(correct[i]) for i, lang in enumerate(data.languages)}


def logged_val_rows(run_dir: Path) -> list[dict[str, str]]:
    import csv

    with open(Path(run_dir) / "logs" / "metrics.csv", newline="") as f:
        return [row for row in csv.DictReader(f) if row.get("val/acc")]


class DieAtEpoch(pl.Callback):
    """End the process at once, as ``kill -9`` would (no clean-up, no exception), when epoch ``epoch``
    starts: for tests of resuming a fit from ``checkpoints/last.ckpt``.

    Args:
        epoch: the epoch whose start the process does not survive.
    """

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch:
            os._exit(137)


class WeightsAtStep(pl.Callback):
    """Save the module's weights, and every learning rate used so far, after optimizer step ``step``
    (``<path>``, a torch file): the reference a checkpoint saved inside an epoch is compared with.

    Args:
        step: the global step (optimizer steps taken) after which to save.
        path: where.
    """

    def __init__(self, step: int, path: str):
        self.step, self.path, self.rates = step, path, []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.rates.append(float(optimizer.param_groups[0]["lr"]))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step and not Path(self.path).exists():
            state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
            torch.save({"state_dict": state, "rates": list(self.rates)}, self.path)


# The counterfactual and planted suites' tiny study: the tiny random model on three languages, a few
# batches per epoch, two epochs (so that two checkpoints exist), no progress bars.
TINY_STUDY_OVERRIDES = [
    "--model.backbone=tiny-random", "--data.init_args.languages=[en, de, ko]",
    "--data.init_args.train_per_language=30", "--data.init_args.dev_per_language=8",
    "--data.init_args.test_per_language=12", "--data.init_args.batch_size=8",
    "--data.init_args.eval_batch_size=16", "--trainer.max_epochs=2", "--trainer.enable_progress_bar=false",
]
