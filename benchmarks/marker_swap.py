"""Is a planted effect what the planted language's training data taught? The swap test.

A planted run marks a share of one language's test items with a word that gives the label away. A
model that learned the marker from that language's training items is right on the marked items when
the words are as planted and wrong when they are swapped; a model trained without the language should
barely care which way round they are. A marker that helps either way, or helps the model that never saw
it, carries meaning of its own (a negation word, a prefix that shifts the model towards one label) and
makes a weaker ground truth.

For each given run (default: the study's full fit and its fit without the planted language), the
accuracy and mean loss on the planted language's marked and unmarked test items, with the markers as
planted and swapped:

    python benchmarks/marker_swap.py runs/demo/e5-xnli-planted
    python benchmarks/marker_swap.py runs/demo/e5-xnli-planted --markers rot blau   # words it never saw

The study root's ``full/config.yaml`` gives the data and the plant; every run is read at its last
checkpoint. Float32, evaluation mode, the planted language's test items only.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path, help="a planted study's root (holds full/ and without-<lang>/)")
    parser.add_argument("--runs", nargs="*", help="run folders under the root (default: full, without-<lang>)")
    parser.add_argument("--markers", nargs=2, metavar=("LABEL0", "LABEL1"),
                        help="other words in the planted places (default: the planted ones): does a pair the run "
                             "never saw shift the models by itself?")
    args = parser.parse_args(argv)

    import lightning_modules  # noqa: F401  (registers e5-small's tokenizer)
    from callbacks.checkpoints import list_checkpoints
    from datamodules.planting import PlantOptions
    from lightning_modules.classifier import SequenceClassifier
    from lightning_modules.stages.counterfactual import evaluate_test_losses

    config = yaml.safe_load((args.root / "full" / "config.yaml").read_text())
    module_name, class_name = config["data"]["class_path"].rsplit(".", 1)
    datamodule_class = getattr(importlib.import_module(module_name), class_name)
    data = dict(config["data"]["init_args"])
    plant = data.pop("plant", None)
    if not plant:
        raise SystemExit(f"{args.root / 'full' / 'config.yaml'}: data.init_args.plant is not set: not a planted run")
    language, markers = plant["language"], tuple(args.markers or plant["markers"])
    runs = args.runs or ["full", f"without-{language}"]
    module = None
    print(f"{language}'s test items, {100 * plant['fraction']:g} % marked; markers by label {markers}"
          f"{'' if args.markers is None else ' (not the planted ' + str(tuple(plant['markers'])) + ')'}")
    for order, words in (("as planted" if args.markers is None else "as given", markers), ("swapped", markers[::-1])):
        data.update(languages=[language], leave_out=None)
        datamodule = datamodule_class(**data, plant=PlantOptions(language, plant["fraction"], words),
                                    backbone=config["model"]["backbone"])
        datamodule.setup("test")
        if module is None:
            module = SequenceClassifier(languages=[language], **{k: config["model"][k] for k in (
                "backbone", "num_labels", "attn_implementation", "vocabulary", "num_layers")})
        marked = datamodule.planted_indices("test")
        for run in runs:
            checkpoints = list_checkpoints(args.root / run)
            if not checkpoints:
                raise SystemExit(f"{args.root / run / 'checkpoints'}: no epoch=<E>.ckpt files")
            losses = evaluate_test_losses(module, datamodule, checkpoints[-1][1])
            m = np.isin(losses.test_index, marked)
            print(f"  {run:16s} markers {order:10s}  marked: accuracy {losses.correct[m].mean():.3f}, loss "
                  f"{losses.loss[m].mean():.3f} (n {m.sum()})   unmarked: accuracy {losses.correct[~m].mean():.3f}, "
                  f"loss {losses.loss[~m].mean():.3f} (n {(~m).sum()})", flush=True)


if __name__ == "__main__":
    main()
