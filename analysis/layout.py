"""The run folder's layout in one place: the names the study runner gives its runs, and the readers of a
run's ``config.yaml``.

Why one module: the runner writes these folders and the pooled analysis, the report and the counterfactual
check read them back; when both sides spell a name, a change to one side silently breaks the other. Nothing
here parses a folder name: what a folder holds (its training seed, its random-mask seed) is read from the
config its fit wrote, and the name is only checked against the one this module would give it. numpy-free,
Lightning-free (bottom floor).

A study's root::

    <root>/[seed<s>/]full/            full fine-tuning (one-seed studies keep the runs at the root)
                     sft/             sparse fine-tuning with each language's subnetwork
                     sft-random<r>/   the same with shuffled subnetworks (mask seed r)
                     without-<lang>/  the counterfactual check's fits (``without-random``: the control)
                     refit-<r>/       the full fine-tuning again with training seed r (retraining's noise)
"""

from __future__ import annotations

from pathlib import Path

import yaml

FULL = "full"
SFT = "sft"
CONFIG_FILE = "config.yaml"  # what ``crossling fit`` writes: the resolved, replayable config
ANALYZE_CONFIG_FILE = "analyze.config.yaml"  # what ``crossling analyze`` writes beside it
# a run-like folder inside a run whose ``sketches/`` hold sentence representations, not gradient sketches
REPRESENTATIONS = "representations"
# a run-like folder inside a run whose ``sketches/`` hold EK-FAC scores in the sketch contract (the ekfac stage)
EKFAC = "ekfac"
COUNTERFACTUAL = "counterfactual"  # the counterfactual check's folder inside the analysed run
STUDY_RECORDS = ".study"  # the study runner's records inside a study root
# the planted studies whose roots form the sweep the front page's detection limit reads (written by the runner)
DETECTION_SWEEP = "detection_limit.json"


def method_stage_name(analysis: str, method: str) -> str:
    """The study stage that ranks one analysis (``natural``, ``sft``, ``seed1-sft-random0``) under an
    attribution method: TracIn's is the one that sketches and ranks (``<analysis>-influence``), another
    method's comes after it; its record in ``.study/`` holds the stage's time and peak memory."""
    return f"{analysis}-influence" if method == "tracin" else f"{analysis}-{method}-analysis"


def is_method_stage(stage: str, method: str) -> bool:
    """Whether a study stage's name is one ``method_stage_name`` gives for ``method``."""
    return stage.endswith("-influence" if method == "tracin" else f"-{method}-analysis")


def seed_folder_name(seed: int) -> str:
    """The folder of one training seed's runs in a study of several seeds."""
    return f"seed{seed}"


def seed_root(root: Path, seeds: list[int], seed: int) -> Path:
    """Where a seed's runs live: the study root itself for a one-seed study, else ``seed<s>/``."""
    return Path(root) if len(seeds) == 1 else Path(root) / seed_folder_name(seed)


def sft_random_name(mask_seed: int) -> str:
    """The run of sparse fine-tuning with shuffled subnetworks drawn from ``mask_seed``."""
    return f"sft-random{mask_seed}"


def removed_run_name(removed: str) -> str:
    """The run directory of the fit that leaves ``removed`` (a language, or ``random``) out."""
    return f"without-{removed}"


def refit_run_name(seed: int) -> str:
    """The run directory of a refit: the analysed run's config with another training seed, nothing removed."""
    return f"refit-{seed}"


def read_run_config(run: Path, name: str = CONFIG_FILE) -> dict | None:
    """A run's ``config.yaml`` (or another command's, e.g. ``analyze.config.yaml``) as a mapping; None when
    the run has none."""
    path = Path(run) / name
    if not path.is_file():
        return None
    return yaml.safe_load(path.read_text(encoding="utf-8")) or {}


def config_value(config: dict | None, *keys: str):
    """``config[k1][k2]...`` or None; ``data`` keys are looked up under ``init_args`` when they are there."""
    node = config
    for key in keys:
        if not isinstance(node, dict):
            return None
        if key not in node and isinstance(node.get("init_args"), dict):
            node = node["init_args"]
        node = node.get(key)
    return node


def training_seed(run: Path) -> int | None:
    """``seed_everything`` of a run's config (None when the run has no config or no integer seed)."""
    value = config_value(read_run_config(run), "seed_everything")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def random_mask_seed(run: Path) -> int | None:
    """``model.random_mask_seed`` of a run's config: the shuffled-subnetwork seed of an ``sft-random`` run."""
    value = config_value(read_run_config(run), "model", "random_mask_seed")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def study_seed_folders(root: Path) -> dict[int, Path]:
    """Training seed -> its folder, for every ``seed<s>/`` of a study of several seeds whose full fit has
    written its config; the seed is the config's, and the folder must carry the name the runner gives it."""
    found = {}
    for path in sorted(Path(root).iterdir()) if Path(root).is_dir() else []:
        seed = training_seed(path / FULL) if path.is_dir() else None
        if seed is not None and path.name == seed_folder_name(seed):
            found[seed] = path
    return found


def sft_random_runs(seed_folder: Path) -> dict[int, Path]:
    """Mask seed -> run, for the shuffled-subnetwork SFT runs of one seed's folder (seed read from the config)."""
    found = {}
    for path in sorted(Path(seed_folder).iterdir()) if Path(seed_folder).is_dir() else []:
        seed = random_mask_seed(path) if path.is_dir() else None
        if seed is not None and path.name == sft_random_name(seed):
            found[seed] = path
    return found
