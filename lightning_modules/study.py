"""``crossling study``: every stage of the paper's study for one task, in order, resumable.

The runner is thin on purpose: each stage is the same ``crossling fit | subnetworks |
analyze`` call a user can type, run in this process with the stage's arguments. A stage
records completion in ``<root>/.study/<stage>.json`` (written last, atomically) together
with a fingerprint of its inputs (its arguments, the config files they name, and the
fingerprints of the stages it depends on), so re-running skips finished stages, a changed
config re-runs that stage and what depends on it (and only that), and ``--from`` forces a
re-run from a stage on.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from analysis import layout
from analysis.atomic import remove_temporaries
from analysis.atomic import write_json_atomic as _write_json


class StudyConfigError(ValueError):
    """A study config that cannot be run: one line naming the file and the key or line (exit 2)."""


@dataclass
class StudyConfig:
    """What a study runs. Config paths are relative to the study config's folder.

    Args:
        root: run directory of the study; each run is a subfolder (full, sft, sft-random<seed>), under
            ``seed<s>/`` per training seed when there are several.
        full: config of full fine-tuning (``crossling fit``). This key and the three below name one config file
            or a list of them, the later overriding the earlier (``--config`` given once for each).
        subnetworks: config of the subnetwork search (``crossling subnetworks``).
        sft: config of sparse fine-tuning (``crossling fit``); None: the chain stops after the natural
            analysis (a ground-truth study: the planted control, the counterfactual check), and the
            subnetwork search runs only when a natural condition needs its masks.
        analyze: config of sketching, influence and report (``crossling analyze``).
        seeds: training seeds; each runs the whole chain (fine-tuning, subnetworks, SFT, their analyses)
            with that seed for everything random in training (``seed_everything``, ``model.init_seed``, the
            order of training batches) on the same data sample (the data's own seed stays fixed). One seed
            keeps the single-run layout; several put each seed's runs under ``seed<s>/`` and the report
            pools them.
        fidelity_seeds: the seeds whose analyses run the fidelity stage (None: every seed); the pooled
            findings take the largest share error measured on any of them.
        random_seeds: seeds of the random-subnetwork SFT runs (paper: 0 1 2).
        natural_conditions: conditions analysed on the fully fine-tuned model.
        sft_conditions: conditions analysed on the SFT run.
        overrides: extra arguments given to every stage (e.g. data sizes, epochs).
        counterfactual: training languages to leave out, one fit each (plus a control leaving out as many
            random examples), checked against TracIn's predicted change of test loss (None: not run; it
            costs one full fine-tuning per language and seed; docs/study.md, "The counterfactual check").
        counterfactual_seeds: the seeds that run the counterfactual check (None: every seed).
        counterfactual_refits: seeds of refits per counterfactual seed: the full fine-tuning again with nothing
            removed, its dropout and batch order from this seed (the head's initialisation and the data stay).
            Their change of test loss is retraining's own noise, against which the check judges every cell
            (None: not measured; each costs one full fine-tuning per seed).
        counterfactual_coupled: leave-out fits read their examples in the full fine-tuning's order with the
            left-out ones deleted (``data.init_args.coupled_order``), instead of a fresh shuffle of the rest.
        summary_split: the split whose majority-class rate the summary compares with dev accuracy.
        detection_limit: planted study configs (this one too, if planted) that differ only in the share
            planted: the front page reports, from those that have run, the smallest share each measure still
            detects (docs/study.md, "The detection limit"); None: no such section.
        attribution_methods: attribution methods run beside TracIn on every analysed run (``trak``, ``repsim``,
            ``ekfac``; docs/methods.md), each one stage per analysis after TracIn's, so the front page can say
            whether the paper's comparisons keep their sign under each (``ekfac`` scores the fully fine-tuned
            model only: it runs where the natural analysis has the condition ``full``); None: TracIn alone.
    """

    root: str = "runs/study"
    full: str | list[str] = "full.yaml"
    subnetworks: str | list[str] = "subnetworks.yaml"
    sft: str | list[str] | None = "sft.yaml"
    analyze: str | list[str] = "analyze.yaml"
    seeds: list[int] = field(default_factory=lambda: [0])
    fidelity_seeds: list[int] | None = None
    random_seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    natural_conditions: list[str] = field(default_factory=lambda: ["full", "own", "random0", "as-en"])
    sft_conditions: list[str] = field(default_factory=lambda: ["own"])
    overrides: list[str] = field(default_factory=list)
    counterfactual: list[str] | None = None
    counterfactual_seeds: list[int] | None = None
    counterfactual_refits: list[int] | None = None
    counterfactual_coupled: bool = False
    detection_limit: list[str] | None = None
    attribution_methods: list[str] | None = None


@dataclass
class Stage:
    name: str
    command: list[str]  # argv of ``crossling``
    depends: list[str]
    resume_fit: Path | None = None  # run dir of a fit stage (resumes from checkpoints/last.ckpt)
    outputs: list[Path] = field(default_factory=list)  # stale when the stage's inputs change
    seed: int | None = None  # the training seed whose chain it belongs to (None: the study's front page)


def stage_folder(stage: Stage) -> Path:
    """The folder a stage writes in: its run directory, or the study's front page for the report."""
    if stage.command[0] == "report":
        return Path(stage.command[1]) / "report"
    for arg in stage.command:
        if arg.startswith("--trainer.default_root_dir="):
            return Path(arg.split("=", 1)[1])
    raise ValueError(f"stage {stage.name}: its command names no run directory ({stage.command})")


CONFIG_FILE_KEYS = ("full", "subnetworks", "sft", "analyze")  # keys naming stage config files


def read_study_mapping(path: Path, chain: tuple[Path, ...] = ()) -> dict:
    """A study config's keys, with those of the study config it names as ``base`` underneath (recursively).

    Why: a study that adds one check to another (the counterfactual check, a planted fraction) should state
    only what it adds. The file's own keys win; ``overrides`` are the base's followed by the file's (later
    arguments win on the command line); stage config files named by a base stay relative to the base's folder."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise StudyConfigError(f"{path}: {where}not valid YAML ({problem})") from None
    if not isinstance(raw, dict):
        raise StudyConfigError(f"{path}: expected a mapping of study keys (root, full, seeds, ...), "
                               f"found a {type(raw).__name__}")
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str) or not base:
        raise StudyConfigError(f"{path}: key 'base': expected the path of another study config, found {base!r}")
    base_path = (path.parent / base).resolve()
    if base_path in (*chain, path):
        raise StudyConfigError(f"{path}: key 'base': {base_path} names this config again (a circle of bases)")
    if not base_path.is_file():
        raise StudyConfigError(f"{path}: key 'base': {base_path} not found")
    inherited = read_study_mapping(base_path, (*chain, path))
    for key in CONFIG_FILE_KEYS:
        value = inherited.get(key)
        if key in raw:
            continue
        if isinstance(value, str):  # resolved where the base names them
            inherited[key] = str(base_path.parent / value)
        elif isinstance(value, list) and all(isinstance(v, str) for v in value):
            inherited[key] = [str(base_path.parent / v) for v in value]
    merged = {**inherited, **raw}
    if isinstance(inherited.get("overrides"), list) and isinstance(raw.get("overrides"), list):
        merged["overrides"] = [*inherited["overrides"], *raw["overrides"]]
    return merged


def load_study_config(path: str | Path) -> tuple[StudyConfig, Path]:
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"study config not found: {path}")
    raw = read_study_mapping(path)
    known = set(StudyConfig.__dataclass_fields__)
    unknown = sorted(set(raw) - known)
    if unknown:
        raise StudyConfigError(f"{path}: unknown key(s) {unknown}; expected some of {sorted(known)}")
    cfg = StudyConfig(**raw)
    check_config_files(cfg, path)
    check_seeds(cfg, path)
    check_counterfactual_languages(cfg, path)
    check_detection_limit(cfg, path)
    check_attribution_methods(cfg, path)
    return cfg, path.parent


def check_attribution_methods(cfg: StudyConfig, path: Path) -> None:
    """Methods beside TracIn are a non-empty list of distinct known names (TracIn always runs)."""
    from analysis.influence.options import METHODS

    methods = cfg.attribution_methods
    if methods is None:
        return
    others = [m for m in METHODS if m != "tracin"]
    if (not isinstance(methods, list) or not methods or not all(isinstance(m, str) for m in methods)
            or len(set(methods)) != len(methods)):
        raise StudyConfigError(f"{path}: key 'attribution_methods': expected a non-empty list of distinct method "
                               f"names (some of {others}), found {methods!r}")
    unknown = [m for m in methods if m not in others]
    if unknown:
        raise StudyConfigError(f"{path}: key 'attribution_methods': unknown method(s) {unknown}; expected some of "
                               f"{others} (TracIn runs in every study)")


def check_detection_limit(cfg: StudyConfig, path: Path) -> None:
    """The planted sweep is a non-empty list of study config files that exist."""
    names = cfg.detection_limit
    if names is None:
        return
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise StudyConfigError(f"{path}: key 'detection_limit': expected a non-empty list of planted study configs, "
                               f"found {names!r}")
    missing = [n for n in names if not (path.parent / n).is_file()]
    if missing:
        raise StudyConfigError(f"{path}: key 'detection_limit': study config(s) {missing} not found "
                               f"(relative to {path.parent})")


def check_counterfactual_languages(cfg: StudyConfig, path: Path) -> None:
    """Languages to leave out are a non-empty list of distinct codes (whether the run trains on them is
    the fit's to say, with the data's language list); refit seeds are new seeds."""
    langs = cfg.counterfactual
    if not isinstance(cfg.counterfactual_coupled, bool):
        raise StudyConfigError(f"{path}: key 'counterfactual_coupled': expected true or false, found "
                               f"{cfg.counterfactual_coupled!r}")
    if langs is None:
        if cfg.counterfactual_coupled:
            raise StudyConfigError(f"{path}: key 'counterfactual_coupled' needs the key 'counterfactual' (the "
                                   "languages to leave out)")
        if cfg.counterfactual_refits is not None:
            raise StudyConfigError(f"{path}: key 'counterfactual_refits' needs the key 'counterfactual' (the languages "
                                   "to leave out): the refits measure that check's noise")
        return
    if not isinstance(langs, list) or not langs or not all(isinstance(x, str) and x for x in langs) \
            or len(set(langs)) != len(langs) or "random" in langs:
        raise StudyConfigError(f"{path}: key 'counterfactual': expected a non-empty list of distinct training language "
                               f"codes (the random control is added by itself), found {langs!r}")
    chosen = cfg.counterfactual_seeds
    if chosen is not None and (not isinstance(chosen, list) or not chosen or any(s not in cfg.seeds for s in chosen)):
        raise StudyConfigError(f"{path}: key 'counterfactual_seeds': expected a non-empty list of the study's seeds "
                               f"{cfg.seeds}, found {chosen!r}")
    refits = cfg.counterfactual_refits
    if refits is not None and (not isinstance(refits, list) or not refits or len(set(refits)) != len(refits)
                               or not all(isinstance(r, int) and not isinstance(r, bool) for r in refits)
                               or any(r in cfg.seeds for r in refits)):
        raise StudyConfigError(f"{path}: key 'counterfactual_refits': expected a non-empty list of distinct integer "
                               f"seeds other than the study's training seeds {cfg.seeds}, found {refits!r}")


def check_config_files(cfg: StudyConfig, path: Path) -> None:
    """Each stage's config is a file name or a non-empty list of them, and each file exists (only ``sft``
    may be null)."""
    for key in CONFIG_FILE_KEYS:
        value = getattr(cfg, key)
        if value is None and key == "sft":
            continue
        names = [value] if isinstance(value, str) else value
        if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
            raise StudyConfigError(f"{path}: key {key!r}: expected a config file or a non-empty list of them"
                                   f"{' (or null: no SFT)' if key == 'sft' else ''}, found {value!r}")
        missing = [n for n in names if not (path.parent / n).is_file()]
        if missing and (key != "subnetworks" or cfg.sft is not None or set(cfg.natural_conditions) - {"full"}):
            raise StudyConfigError(f"{path}: key {key!r}: config file(s) {missing} not found (relative to {path.parent})")


def check_seeds(cfg: StudyConfig, path: Path) -> None:
    """A seed list is a non-empty list of distinct integers; fidelity seeds are among them."""
    for key in ("seeds", "random_seeds"):
        seeds = getattr(cfg, key)
        if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool)
                                                                 for s in seeds):
            raise StudyConfigError(f"{path}: key '{key}': expected a non-empty list of integers, found {seeds!r}")
        repeated = sorted({s for s in seeds if seeds.count(s) > 1})
        if repeated:
            raise StudyConfigError(f"{path}: key '{key}': seed(s) {repeated} repeated in {seeds}; each seed is one run")
    if cfg.fidelity_seeds is not None:
        if not isinstance(cfg.fidelity_seeds, list) or not cfg.fidelity_seeds:
            raise StudyConfigError(f"{path}: key 'fidelity_seeds': expected a non-empty list of seeds or null, "
                                   f"found {cfg.fidelity_seeds!r}")
        unknown = [s for s in cfg.fidelity_seeds if s not in cfg.seeds]
        if unknown:
            raise StudyConfigError(f"{path}: key 'fidelity_seeds': {unknown} not among the study's seeds {cfg.seeds}")


def seed_root(root: Path, cfg: StudyConfig, seed: int) -> Path:
    """Where one training seed's runs live: the study root itself when the study has one seed."""
    return layout.seed_root(root, cfg.seeds, seed)


def training_seed_args(seed: int) -> list[str]:
    """Everything random in training follows the seed; the data sample does not."""
    return [f"--seed_everything={seed}", f"--model.init_seed={seed}", f"--data.init_args.shuffle_seed={seed}"]


# what each analysis step writes in its run, removed when the step's inputs change; the fidelity check
# measures the sketch's share error, which the report then keeps out of the changes it marks
STEP_OUTPUTS = {"sketch": "sketches", "influence": "influence", "fidelity": "fidelity", "report": "report"}


def analysis_outputs(run: Path, steps: tuple[str, ...]) -> list[Path]:
    return [run / STEP_OUTPUTS[step] for step in steps]


def analysis_parts(with_fidelity: bool) -> list[tuple[str, ...]]:
    """The steps of one analysis, grouped by the process that runs them: sketch and influence in one,
    (fidelity and) report in a second.

    A process that has sketched and ranked keeps about 0.2-0.6 GB more resident (freed heap the allocator
    does not hand back) than a fresh one, and what comes after lands on top of it: the fidelity check's
    exact gradients (e5 demo: 4.39 GiB in one process, 3.16 GiB in a fresh one), or the report's figures
    (3.74 GiB against 3.55 GiB for sketch and influence alone; docs/measurements.md, "Memory, disk, and a study
    stopped anywhere").
    """
    return [("sketch", "influence"), ("fidelity", "report") if with_fidelity else ("report",)]


def method_stage(method: str, run: Path, conditions: list[str], analyze_config: list[str],
                 args: list[str]) -> tuple[list[str], list[Path]] | None:
    """The ``crossling analyze`` call that ranks ``run``'s conditions under another attribution method, after
    TracIn's sketches exist, and what it writes; None where the method cannot score those conditions
    (EK-FAC scores the full model only)."""
    from analysis.influence.topk_file import influence_dir_name
    from analysis.layout import EKFAC, REPRESENTATIONS

    steps, extra, outputs = ["influence"], [], [run / influence_dir_name(method)]
    if method == "repsim":  # the representations are a pass of their own, kept apart from the sketches
        steps, extra = ["sketch", "influence"], ["--sketch.kind=representation"]
        outputs.append(run / REPRESENTATIONS)
    elif method == "ekfac":
        if "full" not in conditions:
            return None
        conditions, steps = ["full"], ["ekfac", "influence"]
        outputs.append(run / EKFAC)
    command = ["analyze", *analyze_config, f"--trainer.default_root_dir={run}", f"--stages=[{', '.join(steps)}]",
               f"--conditions=[{', '.join(conditions)}]", *args, *extra, f"--influence.method={method}"]
    return command, outputs


def config_args(base: Path, configs: str | list[str]) -> list[str]:
    """``--config`` arguments of one stage kind: a study key names one config file or a list of them, the
    later ones overriding the earlier (e.g. the demo's analysis config, then a file that adds checkpoints)."""
    paths = [configs] if isinstance(configs, str) else list(configs)
    return [arg for path in paths for arg in ("--config", str((base / path).resolve()))]


def plan_stages(cfg: StudyConfig, base: Path) -> list[Stage]:
    """The study as a list of CLI calls with their dependencies: every seed's chain, then the front page."""
    root = Path(cfg.root).expanduser().resolve()
    stages: list[Stage] = []
    for seed in cfg.seeds:
        prefix = "" if len(cfg.seeds) == 1 else f"{layout.seed_folder_name(seed)}-"
        with_fidelity = cfg.fidelity_seeds is None or seed in cfg.fidelity_seeds
        chain = plan_seed_stages(cfg, base, seed_root(root, cfg, seed), seed, prefix, with_fidelity)
        for stage in chain:
            stage.seed = seed
        stages += chain
    stages.append(Stage("report", ["report", str(root)], [s.name for s in stages if s.name.endswith("analysis")]))
    return stages


def plan_seed_stages(cfg: StudyConfig, base: Path, root: Path, seed: int, prefix: str,
                     with_fidelity: bool) -> list[Stage]:
    """One training seed's chain: full fine-tuning, subnetworks, SFT and random SFT, their analyses."""
    conf = {k: config_args(base, getattr(cfg, k)) for k in CONFIG_FILE_KEYS
            if getattr(cfg, k) is not None}
    full, sft = root / layout.FULL, root / layout.SFT
    subnetworks_dir = full / "subnetworks"
    extra = list(cfg.overrides)

    def fit(config: list[str], run: Path, *args: str) -> list[str]:
        return ["fit", *config, f"--trainer.default_root_dir={run}", *args, *extra,
                *training_seed_args(seed)]

    def name(stage: str) -> str:
        return prefix + stage

    def after(*names: str) -> list[str]:
        return [name(n) for n in names]

    def analysis(stage: str, run: Path, conditions: list[str], *args: str, depends: list[str]) -> list[Stage]:
        """``<stage minus -analysis>-influence`` (sketch, influence), then ``stage`` (what later stages
        depend on)."""
        parts = analysis_parts(with_fidelity)
        names = [name(layout.method_stage_name(stage.removesuffix("-analysis"), "tracin")), name(stage)]
        stages, before = [], depends
        for part, steps in zip(names, parts):
            command = ["analyze", *conf["analyze"], f"--trainer.default_root_dir={run}",
                       f"--stages=[{', '.join(steps)}]", f"--conditions=[{', '.join(conditions)}]", *args, *extra]
            stages.append(Stage(part, command, before, outputs=analysis_outputs(run, steps)))
            before = [part]
        for method in cfg.attribution_methods or []:
            planned = method_stage(method, run, conditions, [*conf["analyze"]], [*args, *extra])
            if planned is not None:
                command, outputs = planned
                # an analysis compared with the full run (--compare_to) reads the full run's ranking by this method
                natural = [] if stage == "natural-analysis" else [name(layout.method_stage_name("natural", method))]
                stages.append(Stage(name(layout.method_stage_name(stage.removesuffix("-analysis"), method)), command,
                                    [names[0], *natural], outputs=outputs))
        return stages

    masks = f"--model.subnetworks={subnetworks_dir}"
    full_stage = Stage(name("full"), fit(conf["full"], full), [], resume_fit=full, outputs=[full / "checkpoints"])
    if cfg.sft is None and all(c == "full" for c in cfg.natural_conditions):  # nothing needs the masks
        return [full_stage, *analysis("natural-analysis", full, cfg.natural_conditions, depends=after("full")),
                *plan_optional_counterfactual(cfg, conf, root, seed, fit, name)]
    stages = [
        full_stage,
        Stage(name("subnetworks"), ["subnetworks", *conf["subnetworks"], f"--trainer.default_root_dir={full}",
                                    *extra], after("full")),
        *analysis("natural-analysis", full, cfg.natural_conditions, depends=after("subnetworks")),
    ]
    if cfg.sft is None:
        return stages + plan_optional_counterfactual(cfg, conf, root, seed, fit, name)
    stages.append(Stage(name("sft"), fit(conf["sft"], sft, masks), after("subnetworks"), resume_fit=sft,
                        outputs=[sft / "checkpoints"]))
    for random_seed in cfg.random_seeds:
        run = root / layout.sft_random_name(random_seed)
        stages.append(Stage(name(layout.sft_random_name(random_seed)),
                            fit(conf["sft"], run, masks, f"--model.random_mask_seed={random_seed}"),
                            after("subnetworks"), resume_fit=run, outputs=[run / "checkpoints"]))
    stages += analysis("sft-analysis", sft, cfg.sft_conditions, masks, f"--compare_to={full}",
                       depends=after("sft", "natural-analysis"))
    for random_seed in cfg.random_seeds:
        run = root / layout.sft_random_name(random_seed)
        stages += analysis(f"{run.name}-analysis", run, [f"random{random_seed}"], masks,
                           f"--compare_to={full}", depends=after(run.name, "natural-analysis"))
    return stages + plan_optional_counterfactual(cfg, conf, root, seed, fit, name)


def plan_optional_counterfactual(cfg: StudyConfig, conf: dict[str, list[str]], root: Path, seed: int, fit, name) -> list[Stage]:
    """The counterfactual stages of this seed, when the study asks for them."""
    if cfg.counterfactual and (cfg.counterfactual_seeds is None or seed in cfg.counterfactual_seeds):
        return plan_counterfactual_stages(cfg, conf, root, fit, name)
    return []


def plan_counterfactual_stages(cfg: StudyConfig, conf: dict[str, list[str]], root: Path, fit, name) -> list[Stage]:
    """One fit per language left out and the random control (same config, seed and schedule as the full
    fine-tuning), the refits with nothing removed (another seed and batch order: retraining's noise), then
    the check that compares their test losses with TracIn's prediction."""
    from analysis.counterfactual import CONTROL

    full = root / "full"
    stages, fits = [], []
    for removed in [*cfg.counterfactual, CONTROL]:
        run = root / layout.removed_run_name(removed)
        fits.append(name(layout.removed_run_name(removed)))
        coupled = ["--data.init_args.coupled_order=true"] if cfg.counterfactual_coupled else []
        stages.append(Stage(fits[-1], fit(conf["full"], run, f"--data.init_args.leave_out={removed}", *coupled), [],
                            resume_fit=run, outputs=[run / "checkpoints"]))
    for refit in cfg.counterfactual_refits or []:
        run = root / layout.refit_run_name(refit)
        fits.append(name(layout.refit_run_name(refit)))
        # after the chain's seed arguments, so these two win: dropout and batch order change, nothing else
        command = [*fit(conf["full"], run), f"--seed_everything={refit}", f"--data.init_args.shuffle_seed={refit}"]
        stages.append(Stage(fits[-1], command, [], resume_fit=run, outputs=[run / "checkpoints"]))
    refits = [f"--counterfactual.refits=[{', '.join(map(str, cfg.counterfactual_refits))}]"] \
        if cfg.counterfactual_refits else []
    command = ["analyze", *conf["analyze"], f"--trainer.default_root_dir={full}",
               "--stages=[counterfactual]", "--conditions=[full]",
               f"--counterfactual.languages=[{', '.join(cfg.counterfactual)}]", *refits, *cfg.overrides]
    # the check scores every method whose inputs the full run holds: after their stages, when the study runs them
    methods = [name(layout.method_stage_name("natural", m)) for m in cfg.attribution_methods or []
               if m != "ekfac" or "full" in cfg.natural_conditions]
    stages.append(Stage(name("counterfactual-analysis"), command, [name("natural-analysis"), *methods, *fits],
                        outputs=[full / "counterfactual"]))
    return stages


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _file_digest(path: str) -> str:
    """A config file's bytes (how studies before 2026-12-07 fingerprinted it; still accepted, see run_study)."""
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def _config_digest(path: str) -> str:
    """A config file's parsed content: a comment or layout change is not a change of what a stage does (a byte
    digest re-ran a finished fit, and removed its checkpoints, when only a config's comments were edited)."""
    try:
        return _digest(yaml.safe_load(Path(path).read_text()))
    except (OSError, yaml.YAMLError, TypeError):
        return _file_digest(path)  # the stage itself will say what is wrong with the file


def stage_fingerprint(stage: Stage, upstream: dict[str, str], digest=_config_digest) -> str:
    """Arguments + the content of every config file they name + the upstream fingerprints."""
    files = {}
    for i, arg in enumerate(stage.command):
        if i > 0 and stage.command[i - 1] == "--config":
            files[arg] = digest(arg)
    return _digest({"command": stage.command, "files": files, "upstream": [upstream[d] for d in stage.depends]})


def marker_matches(marker: dict | None, stage: Stage, fingerprints: dict[str, str], legacy: dict[str, str]) -> bool:
    """Fingerprint the stage both ways (into ``fingerprints`` and ``legacy``) and say whether its marker holds
    either: a study finished before config content was fingerprinted is not run again."""
    fingerprints[stage.name] = stage_fingerprint(stage, fingerprints)
    legacy[stage.name] = stage_fingerprint(stage, legacy, _file_digest)
    return bool(marker) and marker.get("fingerprint") in (fingerprints[stage.name], legacy[stage.name])



def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _fmt(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


def estimate_seconds_left(remaining: list[Stage], durations: dict[str, list[float]]) -> float | None:
    """Seconds the remaining stages will take, from finished stages of the same kind.

    Stages of one kind (fit, subnetworks, analyze, report) cost about the same, whereas a plain
    mean over all stages is dominated by whichever kind ran first. A kind not seen yet counts
    as the mean of every finished stage; the study report only reads files and counts as
    nothing. None before any stage has finished.
    """
    seen = [s for times in durations.values() for s in times]
    if not seen:
        return None
    overall = sum(seen) / len(seen)
    return sum(
        sum(durations[s.command[0]]) / len(durations[s.command[0]]) if durations.get(s.command[0]) else overall
        for s in remaining
        if s.command[0] != "report"
    )


def record_detection_sweep(cfg: StudyConfig, base: Path, root: Path) -> None:
    """Write ``<root>/.study/detection_limit.json``: the roots of the planted studies the front page's
    detection limit reads, with their configs (how to run one that has not run)."""
    path = root / layout.STUDY_RECORDS / layout.DETECTION_SWEEP
    if not cfg.detection_limit:
        path.unlink(missing_ok=True)
        return
    studies = []
    for name in cfg.detection_limit:
        config = (base / name).resolve()
        other, _ = load_study_config(config)
        studies.append({"config": str(config), "root": str(Path(other.root).expanduser().resolve())})
    _write_json(path, {"studies": studies})


def run_study(config: str, from_stage: str | None = None, only: list[str] | None = None) -> Path:
    """Run (or resume) every stage, each in its own process (``stage_process.py``); returns the study root."""
    from .stage_process import run_stage_process

    cfg, base = load_study_config(config)
    root = Path(cfg.root).expanduser().resolve()
    stages = plan_stages(cfg, base)
    names = [s.name for s in stages]
    if from_stage is not None and from_stage not in names:
        raise StudyConfigError(f"--from {from_stage!r}: expected one of {names}")
    markers = root / layout.STUDY_RECORDS
    record_detection_sweep(cfg, base, root)
    fingerprints: dict[str, str] = {}
    legacy: dict[str, str] = {}  # the same under the byte digest older markers hold
    force = False
    started = time.monotonic()
    durations: dict[str, list[float]] = {}  # stage kind -> seconds of finished stages of that kind
    seed_progress = SeedProgress(root, stages, cfg.seeds)
    for number, stage in enumerate(stages, start=1):
        force = force or stage.name == from_stage
        marker = _read_json(markers / f"{stage.name}.json")
        matches = marker_matches(marker, stage, fingerprints, legacy)
        fp = fingerprints[stage.name]
        if not force and matches:
            print(f"[{number}/{len(stages)}] {stage.name}: done ({_fmt(marker.get('seconds', 0))}), skipped", flush=True)
            if marker.get("seconds"):
                durations.setdefault(stage.command[0], []).append(marker["seconds"])
            seed_progress.stage_done(stage, ran=False)
            continue
        if only and stage.name not in only:
            continue
        command = list(stage.command)
        progress = _read_json(markers / f"{stage.name}.started.json")
        resuming = progress is not None and progress.get("fingerprint") == fp and not force
        last = stage.resume_fit / "checkpoints" / "last.ckpt" if stage.resume_fit else None
        if resuming and last is not None and last.is_file():
            command.append(f"--ckpt_path={last}")
        elif not resuming:
            # the inputs changed (or a forced re-run): earlier outputs belong to another model or setting
            for path in stage.outputs:
                if path.exists():
                    shutil.rmtree(path)
        elapsed = time.monotonic() - started
        estimate = estimate_seconds_left(stages[number - 1 :], durations)
        left = f", about {_fmt(estimate)} left" if estimate is not None else ""
        print(f"\n[{number}/{len(stages)}] {stage.name}{' (resuming)' if resuming else ''} — "
              f"elapsed {_fmt(elapsed)}{left}\n  crossling {' '.join(command)}", flush=True)
        remove_temporaries(stage_folder(stage))  # what a killed run of this stage was writing
        _write_json(markers / f"{stage.name}.started.json", {"fingerprint": fp})
        t0 = time.monotonic()
        record = {}
        if command[0] == "report":
            from analysis.study.front_page import write_study_report

            write_study_report(Path(command[1]))
        else:
            peak = run_stage_process(stage.name, command).peak_bytes
            record["peak_rss_mb"] = round(peak / 2**20)
            print(f"  finished {stage.name} in {_fmt(time.monotonic() - t0)}, peak memory {peak / 2**30:.2f} GiB",
                  flush=True)
        seconds = time.monotonic() - t0
        durations.setdefault(stage.command[0], []).append(seconds)
        _write_json(markers / f"{stage.name}.json",
                    {"fingerprint": fp, "seconds": seconds, "command": command, **record})
        (markers / f"{stage.name}.started.json").unlink(missing_ok=True)
        seed_progress.stage_done(stage, ran=True)
    print_summary(root)
    return root


class SeedProgress:
    """Which training seeds' chains have finished, in ``<root>/.study/seeds.json`` (the front page pools
    only those), and the front page written as each seed finishes while others are still to run, so that
    the first findings exist after one seed instead of after all of them."""

    def __init__(self, root: Path, stages: list[Stage], seeds: list[int]):
        from analysis.study.pooled import SEED_PROGRESS

        self.root, self.planned, self.path = root, list(seeds), root / SEED_PROGRESS
        self.left = {seed: {s.name for s in stages if s.seed == seed} for seed in seeds}
        self.finished: list[int] = []
        if len(seeds) > 1:  # a one-seed study is its own front page at the end
            self._write()

    def _write(self) -> None:
        _write_json(self.path, {"planned": self.planned, "finished": self.finished})

    def stage_done(self, stage: Stage, ran: bool) -> None:
        if stage.seed is None or len(self.planned) < 2:
            return
        left = self.left[stage.seed]
        left.discard(stage.name)
        if left or stage.seed in self.finished:
            return
        self.finished.append(stage.seed)
        self._write()
        if ran and len(self.finished) < len(self.planned):
            from analysis.study.front_page import write_study_report

            page = write_study_report(self.root).with_suffix(".html")
            print(f"\n  seed {stage.seed} finished ({len(self.finished)} of {len(self.planned)} seeds): its findings "
                  f"are on the front page now, {page}", flush=True)


def print_summary(root: Path) -> None:
    from analysis.study.summary import study_summary

    print("\n" + study_summary(root), flush=True)


def study_main(argv: list[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="crossling study", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="study config, e.g. configs/demo/pawsx.yaml")
    parser.add_argument("--from", dest="from_stage", help="re-run from this stage on")
    parser.add_argument("--list", action="store_true", help="list the stages and their state, run nothing")
    args = parser.parse_args(argv)
    if args.list:
        cfg, base = load_study_config(args.config)
        root = Path(cfg.root).expanduser().resolve()
        print(f"training seeds: {' '.join(map(str, cfg.seeds))}"
              + ("" if len(cfg.seeds) == 1 else f" (runs under {root}/seed<s>/)"))
        fingerprints: dict[str, str] = {}
        legacy: dict[str, str] = {}
        for stage in plan_stages(cfg, base):
            marker = _read_json(root / ".study" / f"{stage.name}.json")
            state = "done" if marker_matches(marker, stage, fingerprints, legacy) else "to run"
            print(f"{stage.name:28s} {state:7s} crossling {' '.join(stage.command)}")
        return
    from .stage_process import StageFailed

    try:
        run_study(args.config, args.from_stage)
    except StageFailed as stopped:
        print(stopped, file=sys.stderr, flush=True)
        raise SystemExit(stopped.exit_code) from None


def report_main(argv: list[str]) -> None:
    """``crossling report``: rebuild a study's front page and summary from the files its stages wrote
    (after a run's report was re-made, or on a copy of a study's folder), without running any stage."""
    import argparse

    parser = argparse.ArgumentParser(prog="crossling report", description=report_main.__doc__.split("\n")[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("root", nargs="?", help="the study's root folder (its config's root:)")
    where.add_argument("--config", help="the study config (its root: is used)")
    args = parser.parse_args(argv)
    if args.config:
        cfg, base = load_study_config(args.config)
        root = Path(cfg.root).expanduser().resolve()
        record_detection_sweep(cfg, base, root)
    else:
        root = Path(args.root).expanduser().resolve()
    if not root.is_dir() or not any(root.glob("**/report/items.json")):
        raise FileNotFoundError(
            f"{root}: no run report of a study found (expected <run>/report/items.json under it); "
            "run the study first (crossling study --config <study config>)"
        )
    from analysis.study.front_page import write_study_report

    print(f"report: {write_study_report(root).with_suffix('.html')}", flush=True)
    print_summary(root)


if __name__ == "__main__":
    study_main(sys.argv[1:])
