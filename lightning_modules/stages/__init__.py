"""Where each ``crossling`` stage starts: one file per stage, named after it, whose docstring says what
the stage reads and writes under the run directory.

==============================================  ==========================  =================================
command                                         starts in                   writes (under the run directory)
==============================================  ==========================  =================================
``crossling subnetworks``                       ``subnetworks.py``          ``subnetworks/<lang>.json``, ``stats/``
``crossling analyze --stages sketch``           ``sketch.py``               ``sketches/epoch=<E>/<mask>/``
``crossling analyze --stages influence``        ``influence.py``            ``influence/<condition>/``
``crossling analyze --stages fidelity``         ``fidelity.py``             ``fidelity/fidelity.json``
``crossling analyze --stages report``           ``report.py``               ``report/``
``crossling analyze --stages counterfactual``   ``counterfactual.py``       ``counterfactual/``
``crossling analyze --stages ekfac``            ``ekfac.py``                ``ekfac/sketches/epoch=<E>/full/``
==============================================  ==========================  =================================

``crossling fit`` is Lightning's own loop (``CrosslingTrainer`` in ``../cli.py``), and ``crossling
study`` runs all of these in turn (``../study.py``). The stages sit on the top floor: they call the
model's passes in ``callbacks/`` and the numpy work in ``analysis/``, neither of which imports them.
"""

from .counterfactual import CounterfactualOptions, run_counterfactual_stage
from .ekfac import EkfacOptions, run_ekfac_stage
from .fidelity import run_fidelity_stage
from .influence import run_influence_stage
from .report import run_report_stage
from .request import AnalyzeRequest
from .sketch import run_sketch_stage
from .subnetworks import run_subnetworks

ANALYZE_STAGES = {
    "sketch": run_sketch_stage,
    "influence": run_influence_stage,
    "fidelity": run_fidelity_stage,
    "report": run_report_stage,
    "counterfactual": run_counterfactual_stage,
    "ekfac": run_ekfac_stage,
}

__all__ = ["ANALYZE_STAGES", "AnalyzeRequest", "CounterfactualOptions", "EkfacOptions", "run_subnetworks"]
