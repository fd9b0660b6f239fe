"""Per-epoch, weights-only checkpoints (``checkpoints/epoch=<E>.ckpt``), the input of every
later stage, plus ``last.ckpt`` (full trainer state) so an interrupted fit can resume. Optionally also
checkpoints inside an epoch (``checkpoints/epoch=<E>-step=<S>.ckpt``, S the optimizer steps taken), for a
prediction over the part of training where learning happens; stages that read "the run's checkpoints"
read the epoch ones only (``list_checkpoints``), ``list_all_checkpoints`` reads both. A fit that ends
removes ``last.ckpt`` (two thirds of a run's checkpoint bytes are its optimizer state, which nothing
after the fit reads) unless asked to keep it.

Files are written to a temporary name and renamed, so a killed run never leaves a
half-written checkpoint that a later stage would trust.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import re
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch

from analysis.atomic import atomic_write, raise_if_disk_full
from callbacks.preconditioner import factor_adam_preconditioner

FORMAT = 1
_EPOCH = re.compile(r"^epoch=(\d+)\.ckpt$")
_ANY = re.compile(r"^epoch=(\d+)(?:-step=(\d+))?\.ckpt$")


class CheckpointError(ValueError):
    """A file that is not a crossling checkpoint, or a model it does not fit."""


def atomic_torch_save(obj, path: Path) -> None:
    with atomic_write(path, "wb") as f:  # a Python file: a failed write keeps its OSError in torch's error
        torch.save(obj, f)


def adam_record(trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict | None:
    """The factored Adam preconditioner of the module's model (None without an Adam-family optimizer)."""
    model = getattr(pl_module, "model", pl_module)
    for optimizer in trainer.optimizers:
        record = factor_adam_preconditioner(optimizer, model)
        if record is not None:
            return record
    return None


class EpochCheckpoint(pl.Callback):
    """Save ``<run dir>/checkpoints/epoch=<E>.ckpt`` after each training epoch (validation included), and
    ``epoch=<E>-step=<S>.ckpt`` at the positions ``within_epoch`` names.

    Each records the mean learning rate and examples per optimizer step of its epoch so far, and the sum of
    every rate used since training began (``rate_sum``): TracIn weighs a checkpoint's gradient products by
    the step size taken around it, and the counterfactual check turns them into a predicted change of loss
    (``analysis/counterfactual.py``; ``interval_weights`` for any subset of checkpoints).

    Args:
        within_epoch: positions in epochs (1.25 = a quarter into the second epoch) at which to save a checkpoint
            as well; whole numbers are the epoch ends, saved anyway. Denser early where a shortcut is learned
            fast, e.g. ``[0.1, 0.25, 0.5, 1.5]``. Saving changes nothing the model learns.
    """

    def __init__(self, save_last: bool = True, keep_last: bool = False, within_epoch: list[float] | None = None):
        positions = sorted({float(p) for p in within_epoch or []})
        bad = [p for p in positions if not math.isfinite(p) or p <= 0 or p == int(p)]
        if bad:
            raise ValueError(f"trainer.checkpoints_within_epoch: expected positions inside an epoch (positive, not "
                             f"whole: epoch ends are saved anyway, e.g. 0.25 or 1.5), found {bad}")
        self.save_last = save_last
        self.keep_last = keep_last
        self.within_epoch = positions
        self._rates: list[float] = []
        self._examples = 0
        self._rate_sum = 0.0  # every rate used since training began, kept across a resume
        self._save_at: set[int] = set()  # global steps of within_epoch, fixed when training starts
        self._resume_rng: dict | None = None
        self._resume_rate_sum: float | None = None

    # A fit resumed from last.ckpt must draw the dropout masks the uninterrupted fit drew, or every later
    # stage differs. Lightning's checkpoint holds no RNG state: last.ckpt carries the one at the epoch's end,
    # put back when training starts again (the point an uninterrupted fit goes on from).
    def state_dict(self) -> dict:
        return {"rng": collect_rng_states(), "rate_sum": self._rate_sum}

    def load_state_dict(self, state_dict: dict) -> None:
        self._resume_rng = state_dict.get("rng")
        self._resume_rate_sum = state_dict.get("rate_sum")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._resume_rng is not None:
            restore_rng_states(self._resume_rng)
            self._resume_rng = None
        self._rate_sum = self._resume_rate_sum or 0.0
        self._resume_rate_sum = None
        self._save_at = self.within_epoch_steps(trainer) if self.within_epoch else set()

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._rates, self._examples = [], 0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        if isinstance(batch, dict) and "labels" in batch:
            self._examples += int(len(batch["labels"])) * trainer.world_size

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        rate = float(optimizer.param_groups[0]["lr"])  # the rate this step uses
        self._rates.append(rate)
        self._rate_sum += rate

    def epoch_steps(self, trainer: pl.Trainer) -> int:
        """Optimizer steps per epoch (the last, partial accumulation steps too)."""
        return math.ceil(trainer.num_training_batches / max(1, trainer.accumulate_grad_batches))

    def within_epoch_steps(self, trainer: pl.Trainer) -> set[int]:
        """The global steps (optimizer steps taken) after which ``within_epoch`` saves."""
        per_epoch = self.epoch_steps(trainer)
        steps = set()
        for position in self.within_epoch:
            epoch = int(position)
            inside = round((position - epoch) * per_epoch)
            if 0 < inside < per_epoch:  # a position that rounds onto an epoch end is that end's checkpoint
                steps.add(epoch * per_epoch + inside)
        return steps

    def payload(self, trainer: pl.Trainer, pl_module: pl.LightningModule, within_epoch: bool) -> dict:
        steps = len(self._rates)
        return {
            "crossling": {
                "format": FORMAT,
                "epoch": trainer.current_epoch,
                "global_step": trainer.global_step,
                "within_epoch": within_epoch,
                "learning_rate": sum(self._rates) / steps if steps else None,
                "optimizer_steps": steps,
                "examples_per_step": self._examples / steps if steps else None,
                "rate_sum": self._rate_sum,
                "epoch_steps": self.epoch_steps(trainer),
                # constructor arguments only (LightningCLI adds "_instantiator"), so that
                # ``type(module)(**hparams)`` rebuilds the model
                "hparams": {k: v for k, v in pl_module.hparams.items() if not k.startswith("_")},
            },
            "state_dict": {k: v.detach().cpu() for k, v in pl_module.state_dict().items()},
            # Adam's preconditioner, factored per linear layer (tensors: kept out of the plain metadata above)
            "adam": adam_record(trainer, pl_module),
        }

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if step not in self._save_at or trainer.sanity_checking or not trainer.is_global_zero:
            return
        path = Path(trainer.default_root_dir) / "checkpoints" / f"epoch={trainer.current_epoch}-step={step}.ckpt"
        # with gradient accumulation several batches end on one step: the first that reaches it saves
        if not path.is_file():
            atomic_torch_save(self.payload(trainer, pl_module, within_epoch=True), path)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        directory = Path(trainer.default_root_dir) / "checkpoints"
        epoch = trainer.current_epoch
        if trainer.is_global_zero:
            atomic_torch_save(self.payload(trainer, pl_module, within_epoch=False), directory / f"epoch={epoch}.ckpt")
        if self.save_last:
            # all ranks take part; Lightning writes on rank zero only
            tmp = directory / "last.ckpt.tmp"
            try:
                trainer.save_checkpoint(tmp, weights_only=False)
            except OSError as err:
                tmp.unlink(missing_ok=True)
                raise_if_disk_full(err, directory / "last.ckpt")
                raise
            if trainer.is_global_zero:
                os.replace(tmp, directory / "last.ckpt")
        trainer.strategy.barrier()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # reached only when the fit ended (not when it was stopped): the resume state has served
        if self.save_last and not self.keep_last and trainer.is_global_zero:
            (Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt").unlink(missing_ok=True)


def collect_rng_states() -> dict:
    """Python's, numpy's and torch's (CPU and CUDA) global RNG states, in types a weights-only load reads."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "python": [version, list(internal), gauss],
    }


def restore_rng_states(states: dict) -> None:
    """Put back what ``collect_rng_states`` took."""
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """The run's per-epoch checkpoints as (epoch, path), sorted by epoch."""
    directory = Path(run_dir) / "checkpoints"
    found = []
    for path in directory.glob("epoch=*.ckpt"):
        if m := _EPOCH.match(path.name):
            found.append((int(m.group(1)), path))
    return sorted(found)


def list_all_checkpoints(run_dir: str | Path) -> list[tuple[str, Path]]:
    """Every checkpoint of the run, those inside an epoch too, as (name without ``.ckpt``, path), in
    training order."""
    found = []
    for path in (Path(run_dir) / "checkpoints").glob("epoch=*.ckpt"):
        if m := _ANY.match(path.name):
            epoch, step = int(m.group(1)), m.group(2)
            found.append(((epoch, math.inf if step is None else int(step)), path.name[: -len(".ckpt")], path))
    return [(name, path) for _, name, path in sorted(found)]


def load_checkpoint(path: str | Path) -> dict:
    """Load a crossling checkpoint safely (no unpickling of arbitrary objects)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure means "not usable", said with the file name
        raise CheckpointError(f"{path}: not a loadable checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(payload, dict) or "crossling" not in payload or "state_dict" not in payload:
        keys = sorted(payload)[:8] if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(
            f"{path}: not a crossling checkpoint (expected keys 'crossling' and 'state_dict', found {keys}); "
            "use the checkpoints/epoch=<E>.ckpt files that crossling fit writes"
        )
    return payload


def load_weights(module: torch.nn.Module, path: str | Path) -> dict:
    """Load a crossling checkpoint's weights into ``module``; returns the checkpoint's metadata."""
    payload = load_checkpoint(path)
    state, own = payload["state_dict"], module.state_dict()
    # checked before loading: load_state_dict raises a bare RuntimeError on a shape mismatch
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)}, model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and torch.is_tensor(v) and v.shape != own[k].shape
    ]
    if missing or unexpected or mismatched:
        raise CheckpointError(
            f"{path}: weights do not fit this model (missing {missing[:4]}, unexpected {unexpected[:4]}, "
            f"shape mismatch {mismatched[:4]}); the checkpoint was trained with backbone "
            f"{payload['crossling'].get('hparams', {}).get('backbone')!r}"
        )
    module.load_state_dict(state)
    return payload["crossling"]


def fingerprint(path: str | Path) -> str:
    """A short content hash of a checkpoint file, recorded by every artifact derived from it."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()[:16]
