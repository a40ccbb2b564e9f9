"""upcycle: turn a dense Hugging Face language model into a Mixture-of-Experts.

Python entry points (the CLI `upcycle` wraps the same functions):

    from upcycle import upcycle_model, save_moe, load_moe
    moe = upcycle_model(dense_model, MoESpec(num_experts=8, top_k=2), InitSpec(method="copy"), seed=0)
    save_moe(moe, "out/", format="auto")
"""

__version__ = "0.1.0"

from upcycle.config import BuildConfig, ExportSpec, InitSpec, MoESpec  # noqa: E402
from upcycle.errors import UpcycleError  # noqa: E402
from upcycle.moe.model import upcycle_model  # noqa: E402
from upcycle.export.save import save_moe  # noqa: E402
from upcycle.export.load import load_moe  # noqa: E402

__all__ = [
    "BuildConfig", "ExportSpec", "InitSpec", "MoESpec", "UpcycleError",
    "upcycle_model", "save_moe", "load_moe",
]
