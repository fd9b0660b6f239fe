"""Kill a study with SIGKILL at random moments of every stage, resume it each time, and compare what it
ends with to a study that ran through.

    python scripts/kill_anywhere.py [--kills 16] [--seed 0] [--workdir DIR] [--keep]

A small study on the tiny random model (every stage of the demo's chain: full fine-tuning, subnetworks,
the natural analysis with its fidelity stage, SFT, random-subnetwork SFT, their analyses, the front page)
runs once uninterrupted. Then the same study runs again in the same folder, and is killed with SIGKILL,
the study and its stage's process together (as power loss or the out-of-memory killer would), ``--kills``
times: kill ``i`` falls in stage ``i mod stages`` (so every stage is hit; a stage's second kill falls in
its resumed run), at a moment drawn uniformly over that stage's duration in the uninterrupted run. After each kill the same command resumes it; after
the last, it runs to the end. Every file of the two studies is then compared:

- byte for byte, except the files listed in ``VOLATILE`` (the study's timing markers, which record
  seconds and memory, and the training log, which a resumed fit writes again from its last epoch),
- checkpoints by their tensors (a ``torch.save`` archive names its records after the file).

It prints one line per kill and a verdict per file kind, and exits 1 when any file differs or is left
half-written (a temporary file), 0 otherwise. ``tests/test_kill_anywhere.py`` runs a fast version.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# files whose content is allowed to differ between a killed-and-resumed study and one that ran through
VOLATILE = (
    ".study/",  # stage markers: seconds and peak memory of the stage's last run
    "logs/metrics.csv",  # a resumed fit logs its remaining epochs again
    "logs/hparams.yaml",
)


def write_study(workdir: Path, root: Path, k: int = 8, fidelity: dict | None = None, **keys) -> Path:
    """A study on the tiny random model: every stage, a few batches each. ``k`` sizes the sketches,
    ``fidelity`` replaces the fidelity stage's sample sizes (None keeps the PAWS-X demo's), ``keys`` set
    more study keys (seeds, natural_conditions, counterfactual); the study suite writes its studies here too."""
    import yaml

    analyze = yaml.safe_load((REPO / "configs/demo/pawsx-analyze.yaml").read_text())
    analyze["sketch"]["k"] = k
    analyze["influence"].update(m=10, bootstrap_resamples=50)
    if fidelity is not None:
        analyze["fidelity"] = fidelity
    (workdir / "analyze.yaml").write_text(yaml.safe_dump(analyze))
    study = {
        "root": str(root),
        "full": str(REPO / "configs/demo/pawsx-full.yaml"),
        "subnetworks": str(REPO / "configs/demo/pawsx-subnetworks.yaml"),
        "sft": str(REPO / "configs/demo/pawsx-sft.yaml"),
        "analyze": str(workdir / "analyze.yaml"),
        "random_seeds": [0],
        "natural_conditions": ["full", "own", "random0"],
        "sft_conditions": ["own"],
        "overrides": [
            "--model.backbone=tiny-random",
            "--data.init_args.languages=[en, de, ko]",
            "--data.init_args.train_per_language=48",
            "--data.init_args.dev_per_language=16",
            "--data.init_args.test_per_language=12",
            "--data.init_args.batch_size=8",
            "--data.init_args.eval_batch_size=16",
            "--trainer.max_epochs=2",
            "--trainer.enable_progress_bar=false",
        ],
    } | keys
    path = workdir / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def environment() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", WANDB_MODE="disabled",
               PYTHONWARNINGS="ignore", PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""))
    return env


def start_study(config: Path, log) -> subprocess.Popen:
    # a session of its own, so that one killpg reaches the study and its stage's process together
    return subprocess.Popen([sys.executable, "-m", "lightning_modules.main", "study", "--config", str(config)],
                            cwd=REPO, env=environment(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def run_through(config: Path, log) -> None:
    proc = start_study(config, log)
    if proc.wait() != 0:
        raise SystemExit(f"kill_anywhere: the study failed (exit status {proc.returncode}); its log: {log.name}")


def stage_durations(root: Path) -> dict[str, float]:
    """Each stage's seconds in the uninterrupted run, in the order the stages ran."""
    markers = [p for p in (root / ".study").glob("*.json") if not p.name.endswith(".started.json")]
    markers.sort(key=lambda p: p.stat().st_mtime)
    return {p.stem: json.loads(p.read_text())["seconds"] for p in markers}


@dataclass
class Kill:
    stage: str
    after: float  # seconds after the stage started


def plan_kills(durations: dict[str, float], kills: int, seed: int) -> list[Kill]:
    """Kill ``i`` in stage ``i mod stages``, in the order the stages run (a stage's second kill falls in its
    resumed run, right after its first)."""
    rng = random.Random(seed)
    stages = list(durations)
    plan = [Kill(stages[i % len(stages)], rng.uniform(0.0, durations[stages[i % len(stages)]])) for i in range(kills)]
    return sorted(plan, key=lambda kill: stages.index(kill.stage))


def kill_at(config: Path, root: Path, kill: Kill, log) -> str:
    """Start (resume) the study, SIGKILL it ``kill.after`` seconds into ``kill.stage``; say what happened."""
    done, started = root / ".study" / f"{kill.stage}.json", root / ".study" / f"{kill.stage}.started.json"
    if done.exists():
        return "stage already done: no kill"
    proc = start_study(config, log)
    while proc.poll() is None and not started.exists() and not done.exists():
        time.sleep(0.02)
    began = time.monotonic()
    while proc.poll() is None and time.monotonic() - began < kill.after:
        time.sleep(0.02)
    if proc.poll() is not None:
        return f"study ended first (exit status {proc.returncode})"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return f"killed {time.monotonic() - began:.2f} s into the stage" + (" (it had finished)" if done.exists() else "")


def tensors(path: Path) -> bytes:
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    return b"".join(k.encode() + v.numpy().tobytes() for k, v in sorted(state.items()) if torch.is_tensor(v))


def compare_trees(reference: Path, resumed: Path) -> tuple[list[str], dict[str, int]]:
    """(problems, files compared per kind)."""
    problems, counts = [], {"identical": 0, "same tensors": 0, "volatile": 0}
    ref = {p.relative_to(reference).as_posix() for p in reference.rglob("*") if p.is_file()}
    got = {p.relative_to(resumed).as_posix() for p in resumed.rglob("*") if p.is_file()}
    for name in sorted(got - ref):
        problems.append(f"{name}: left by the killed runs, not written by the uninterrupted one"
                        + (" (a half-written temporary file)" if ".tmp" in name else ""))
    for name in sorted(ref - got):
        problems.append(f"{name}: missing after resuming")
    for name in sorted(ref & got):
        a, b = reference / name, resumed / name
        if any(name.startswith(v) or f"/{v}" in f"/{name}" for v in VOLATILE):
            counts["volatile"] += 1
        elif a.read_bytes() == b.read_bytes():
            counts["identical"] += 1
        elif name.endswith(".ckpt") and tensors(a) == tensors(b):
            counts["same tensors"] += 1
        else:
            problems.append(f"{name}: differs")
    return problems, counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=16, help="SIGKILLs, spread round-robin over the stages")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    parser.add_argument("--workdir", type=Path, help="where the two studies go (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args(argv)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="crossling-kill-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    root, reference = workdir / "runs", workdir / "reference"
    for path in (root, reference):
        shutil.rmtree(path, ignore_errors=True)
    config = write_study(workdir, root, fidelity={"n_test": 8, "n_train": 24})
    try:
        with open(workdir / "study.log", "w") as log:
            t0 = time.monotonic()
            run_through(config, log)
            print(f"uninterrupted study: {time.monotonic() - t0:.0f} s", flush=True)
            durations = stage_durations(root)
            root.rename(reference)  # the same path for both: files that name their folder stay comparable
            for i, kill in enumerate(plan_kills(durations, args.kills, args.seed), start=1):
                what = kill_at(config, root, kill, log)
                print(f"kill {i:2d}/{args.kills}: {kill.stage:24s} at {kill.after:6.2f} s of "
                      f"{durations[kill.stage]:6.2f}: {what}", flush=True)
            run_through(config, log)
        problems, counts = compare_trees(reference, root)
        print(f"compared: {counts['identical']} files identical, {counts['same tensors']} checkpoints with the "
              f"same tensors, {counts['volatile']} timing and log files not compared", flush=True)
        for problem in problems:
            print(f"DIFFERENT {problem}", flush=True)
        print("kill_anywhere: " + ("every output equals the uninterrupted study's" if not problems
                                   else f"{len(problems)} file(s) differ"), flush=True)
        return 1 if problems else 0
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
