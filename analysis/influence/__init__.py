"""The influence stage: gradient sketches → TracIn rankings → language contributions, per condition.

Reads ``sketches/epoch=<E>/<mask>/<split>.npy`` (+ ``.json`` sidecar) as fixed by the file contracts,
and writes ``influence/<condition>/topk.npz``, ``contributions.csv`` and ``meta.json``. A condition
pairs each test language with a mask (``analysis.masks.condition_masks``); its test examples are
ranked against the training sketches taken under the *same* mask at the same checkpoint.

The stage is resumable: a condition whose ``topk.npz`` was computed from the same inputs (sidecar
contents, array sizes) with the same ranking options is not recomputed, and its contributions are
only recomputed when the bootstrap options change. Outputs are written to temporary names and
renamed, so an interrupted run never leaves a file a later stage would trust.

Also here: ``explain`` (a test example's most influential training examples) and
``compare_rankings`` (fidelity of approximate rankings against exact ones).
"""

from .explain import Explanation, InfluentialExample, explain
from .options import InfluenceError, InfluenceOptions, MissingInputs
from .ranking import plan_condition, rank_condition
from .ranking_fidelity import Fidelity, compare_rankings
from .stage import run_influence, run_label
from .tables import check_same_test_split, condition_table, difference_table, kept_indices
from .topk_file import TOPK_FORMAT, TopKFile, load_topk, save_topk, topk_path

__all__ = [
    "Explanation",
    "Fidelity",
    "InfluenceError",
    "InfluenceOptions",
    "InfluentialExample",
    "MissingInputs",
    "TOPK_FORMAT",
    "TopKFile",
    "check_same_test_split",
    "compare_rankings",
    "condition_table",
    "difference_table",
    "explain",
    "kept_indices",
    "load_topk",
    "plan_condition",
    "rank_condition",
    "run_influence",
    "run_label",
    "save_topk",
    "topk_path",
]
