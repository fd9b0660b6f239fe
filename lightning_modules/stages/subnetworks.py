"""``crossling subnetworks``: each language's subnetwork, searched on the run's fine-tuned checkpoint.

Reads ``<run>/checkpoints/epoch=<E>.ckpt`` (the last, or ``--ckpt_path``) and the datamodule's
dev split; writes ``<run>/subnetworks/<lang>.json`` (mask, importance, pruning trace, what it was
computed from, the majority-class rate and whether the search was degenerate: its floor not above
that rate) and ``<run>/subnetworks/stats/`` (Table 1, overlaps, figures). A language whose JSON
already records this checkpoint, data and options is skipped, so a stopped search resumes.
The measurements are in ``callbacks/head_importance.py``, one language's search in
``callbacks/pruning.py``; ``SubnetworkSearch`` runs this stage when ``fit`` ends.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import nn

from analysis.atomic import write_json_atomic
from analysis.mask_stats import write_mask_statistics
from analysis.masks import check_mask
from callbacks.checkpoints import CheckpointError, fingerprint, list_checkpoints, load_weights
from callbacks.head_importance import is_distributed, rank_world
from callbacks.pruning import SubnetworkOptions, heads_per_step, language_examples, prune_language
from datamodules.errors import DataError

log = logging.getLogger(__name__)


def run_subnetworks(
    module, datamodule, run_dir: str | Path, options: SubnetworkOptions | None = None, ckpt_path: str | None = None
) -> dict[str, Path]:
    """The stage as ``crossling subnetworks`` runs it: ``find_subnetworks`` on ``ckpt_path``, by default
    the run's last checkpoint (the fine-tuned model whose subnetworks the later stages gate)."""
    run_dir = Path(run_dir)
    if ckpt_path is None:
        found = list_checkpoints(run_dir)
        if not found:
            raise CheckpointError(f"no checkpoints/epoch=<E>.ckpt in {run_dir}: give --ckpt_path or run fit first")
        ckpt_path = str(found[-1][1])
    return find_subnetworks(module, datamodule, run_dir, options or SubnetworkOptions(), ckpt_path)


def _data_key(datamodule, options: SubnetworkOptions) -> dict:
    """What decides which examples the search sees (compared when resuming)."""
    sizes = getattr(datamodule, "sizes", {})
    splits = sorted({options.data_split, options.eval_split})
    return {
        "datamodule": type(datamodule).__name__,
        "languages": list(datamodule.languages),
        "source": getattr(datamodule, "source", None),
        "data_dir": getattr(datamodule, "data_dir", None),
        "hub_id": getattr(datamodule, "hub_id", None),
        "sizes": {split: sizes.get(split) for split in splits} if isinstance(sizes, dict) else None,
        "seed": getattr(datamodule, "seed", None),
        "max_length": getattr(datamodule, "max_length", None),
    }


def state_fingerprint(module: nn.Module) -> str:
    """A content hash of a module's weights, for a search run on an in-memory model."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}:{t.dtype}:{tuple(tensor.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return "state:" + h.hexdigest()[:16]


def _is_done(path: Path, fp: str, options: SubnetworkOptions, data_key: dict, shape: tuple[int, int]) -> bool:
    """Whether ``path`` already holds this checkpoint's subnetwork under these options and data."""
    if options.overwrite or not path.is_file():
        return False
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        log.warning("%s: unreadable, recomputing it", path)
        return False
    if not isinstance(data, dict):
        return False
    same = (
        data.get("checkpoint_fingerprint") == fp
        and data.get("options") == options.search_key()
        and data.get("data") == data_key
    )
    if same:
        check_mask(
            data.get("mask"), shape, f"{path}: key 'mask'"
        )  # same model: a wrong shape is a broken file
    return same


def _pick_device(module: nn.Module, device: str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    current = next(module.parameters()).device
    if current.type == "cpu" and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return current



def find_subnetworks(
    module,
    datamodule,
    run_dir: str | Path,
    options: SubnetworkOptions | None = None,
    ckpt_path: str | Path | None = None,
) -> dict[str, Path]:
    """Search every language's subnetwork and write ``<run_dir>/subnetworks/<lang>.json`` + ``stats/``.

    ``module`` is a SequenceClassifier (its ``.model`` and ``.gates`` are used); with
    ``ckpt_path`` its weights are first loaded from that crossling checkpoint. Languages whose
    JSON already records this checkpoint's fingerprint, the same data and the same options
    are skipped, so an interrupted search resumes. Returns language -> JSON path, plus
    ``"stats"`` -> the statistics folder.
    """
    options = options or SubnetworkOptions()
    run_dir = Path(run_dir)
    out_dir = run_dir / "subnetworks"
    checkpoint_meta: dict = {}
    if ckpt_path is not None:
        checkpoint_meta = load_weights(module, ckpt_path)
        fp = fingerprint(ckpt_path)
    else:
        fp = state_fingerprint(module)
    all_languages = list(datamodule.languages)
    languages = list(options.languages) if options.languages else all_languages
    unknown = [lang for lang in languages if lang not in all_languages]
    if unknown:
        raise DataError(f"subnetworks.languages: {unknown} not among the data's languages {all_languages}")
    languages = [lang for lang in all_languages if lang in languages]  # the data's order

    module.to(_pick_device(module, options.device))
    shape = module.gates.shape
    heads_per_step(shape, options.step_fraction)  # fail before any work if the step is impossible
    data_key = _data_key(datamodule, options)
    rank, _ = rank_world()

    todo = [
        lang for lang in languages if not _is_done(out_dir / f"{lang}.json", fp, options, data_key, shape)
    ]
    if is_distributed():  # one decision for all ranks, so the collectives stay in step
        box = [todo]
        torch.distributed.broadcast_object_list(box, src=0)
        todo = box[0]
    for lang in todo:  # every language's data is there before hours are spent on the first
        for split, limit in (
            (options.data_split, options.num_examples),
            (options.eval_split, options.eval_examples),
        ):
            language_examples(datamodule, split, lang, limit, out_dir / f"{lang}.json")
    skipped = [lang for lang in languages if lang not in todo]
    if skipped and rank == 0:
        log.info("subnetworks: %s already done for checkpoint %s; skipping", skipped, fp)

    from tqdm.auto import tqdm

    show = options.progress and rank == 0
    for lang in tqdm(todo, desc="subnetworks", unit="lang", disable=not show):
        path = out_dir / f"{lang}.json"
        record = prune_language(module, datamodule, lang, options, path)
        record.update(
            {
                "checkpoint": None if ckpt_path is None else str(ckpt_path),
                "checkpoint_epoch": checkpoint_meta.get("epoch"),
                "checkpoint_fingerprint": fp,
                "options": options.search_key(),
                "data": data_key,
            }
        )
        if rank == 0:
            write_json_atomic(path, record)
            log.info(
                "subnetwork %s: base accuracy %.4f, %d of %d heads disabled (%s)",
                lang,
                record["base_accuracy"],
                record["disabled_heads"],
                shape[0] * shape[1],
                record["stop_reason"],
            )
            if record["degenerate"]:
                log.warning("subnetwork %s is degenerate: %s", lang, record["degenerate_reason"])
    paths = {lang: out_dir / f"{lang}.json" for lang in languages}
    if is_distributed():
        torch.distributed.barrier()
    if rank == 0:
        write_mask_statistics(out_dir, languages)
    if is_distributed():
        torch.distributed.barrier()
    paths["stats"] = out_dir / "stats"
    return paths


class SubnetworkSearch(pl.Callback):
    """Run the subnetwork search on the just-trained model when ``fit`` ends.

    The weights are taken from the run's last ``checkpoints/epoch=<E>.ckpt`` (the same as
    the in-memory model), so the JSON names a checkpoint later stages can fingerprint.

    Args:
        options: the search options (``SubnetworkOptions``).
    """

    def __init__(self, options: SubnetworkOptions | None = None):
        self.options = options or SubnetworkOptions()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if getattr(trainer, "interrupted", False):
            return
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is None:
            raise DataError("SubnetworkSearch needs a TaskDataModule (fit was given bare dataloaders)")
        checkpoints = list_checkpoints(trainer.default_root_dir)
        ckpt = checkpoints[-1][1] if checkpoints else None
        find_subnetworks(pl_module, datamodule, Path(trainer.default_root_dir), self.options, ckpt)
