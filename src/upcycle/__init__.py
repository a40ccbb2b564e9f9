"""upcycle: turn a dense Hugging Face language model into a Mixture-of-Experts.

Python entry points (the CLI `upcycle` wraps the same functions):

    from upcycle import upcycle_model, save_moe, load_moe, MoESpec, InitSpec
    moe = upcycle_model(dense_model, MoESpec(num_experts=8, top_k=2), InitSpec(method="copy"), seed=0)
    save_moe(moe, "out/", format="auto")

Names are imported on first use, so `upcycle` (and the CLI) start without loading torch.
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "BuildConfig": "upcycle.config", "ExportSpec": "upcycle.config", "InitSpec": "upcycle.config",
    "MoESpec": "upcycle.config", "UpcycleError": "upcycle.errors", "upcycle_model": "upcycle.moe.model",
    "save_moe": "upcycle.export.save", "load_moe": "upcycle.export.load",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'upcycle' has no attribute {name!r}")
