"""Which task mix `data: suite` means: `data.suite.mix` names one (config.SuiteMix), built here.

    builtin   tasks.Suite: the toy suite the 2.6M-parameter suite base was pre-trained for
    smol      smol.SmolSuite: the same four domains calibrated for SmolLM2-135M-Instruct under LoRA

Training rows (data/build.py) and test items (eval/checkpoints.py) both come from `make_suite`, so
a run is scored on the mix it trained on.
"""

from __future__ import annotations

from upcycle.suite import smol, tasks

MIXES = {"builtin": tasks.Suite, smol.MIX: smol.SmolSuite}


def make_suite(spec):
    """The mix `spec` (a config.SuiteSpec) names, with its seed and sizes."""
    return MIXES[spec.mix](spec.seed, spec.train_per_domain, spec.test_per_domain)
