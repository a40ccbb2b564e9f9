"""Per-architecture facts as data: which dense models upcycle supports and how each MoE format is spelled.

Every fact about a model family lives here once; code elsewhere looks it up instead of branching
on model type. A dense architecture names its MLP tensors; an MoE format says which stock
`transformers` class it is, which routings it can express exactly, how its tensors are named on
disk (what `save_pretrained` writes), and how a dense config becomes its config.

Tensor *roles* are the canonical, format-independent names of an MoE layer's tensors:
    ("router",)                      [N, H]
    ("expert", e, "gate_proj")       [I_e, H]   also up_proj [I_e, H], down_proj [H, I_e]
    ("shared", "gate_proj")          [I_s, H]   also up_proj, down_proj; I_s = shared width
    ("shared_gate",)                 [1, H]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping

if TYPE_CHECKING:  # types only: this module is data, and imports nothing of upcycle's at run time
    from upcycle.config import MoESpec, Routing

PROJS = ("gate_proj", "up_proj", "down_proj")
Role = tuple


@dataclass(frozen=True)
class DenseArchitecture:
    """A dense decoder family whose SwiGLU MLP can be upcycled."""

    model_type: str
    hf_class: str
    # Config values the MoE layers cannot honour: {key: required value}.
    requires: Mapping[str, Any] = field(default_factory=dict)
    layer_prefix: str = "model.layers.{layer}."
    mlp_prefix: str = "model.layers.{layer}.mlp."

    def mlp_key(self, layer: int, proj: str) -> str:
        return f"{self.mlp_prefix.format(layer=layer)}{proj}.weight"


DENSE_ARCHITECTURES: dict[str, DenseArchitecture] = {
    a.model_type: a
    for a in [
        DenseArchitecture("llama", "LlamaForCausalLM", requires={"mlp_bias": False}),
        DenseArchitecture("mistral", "MistralForCausalLM"),
        DenseArchitecture("qwen2", "Qwen2ForCausalLM"),
        DenseArchitecture("qwen3", "Qwen3ForCausalLM"),
    ]
}


@dataclass(frozen=True)
class AttentionForm:
    """How a stock class's attention reads its config: the facts its forward pass takes from there.

    Both dense and MoE classes are described, so a dense config and the MoE config made from it can
    be compared fact by fact (upcycle.dense_config.forward_facts) instead of trusting key names.
    """

    rotary: str                 # the rotary embedding class in the model's modeling module
    qkv_bias: str | bool        # the config attribute saying whether q/k/v have a bias, or the fixed answer
    o_bias: str | bool          # likewise for o_proj
    # "none" | "every_layer" (config.sliding_window on every layer) | "every_layer_switched" (the same,
    # only if use_sliding_window) | "layer_types" (config.sliding_window on the "sliding_attention" layers)
    window: str
    qk_norm: bool = False


ATTENTION_FORMS: dict[str, AttentionForm] = {
    "llama": AttentionForm("LlamaRotaryEmbedding", "attention_bias", "attention_bias", "none"),
    "mistral": AttentionForm("MistralRotaryEmbedding", False, False, "every_layer"),
    "qwen2": AttentionForm("Qwen2RotaryEmbedding", True, False, "layer_types"),
    "qwen3": AttentionForm("Qwen3RotaryEmbedding", "attention_bias", "attention_bias", "layer_types", qk_norm=True),
    "mixtral": AttentionForm("MixtralRotaryEmbedding", False, False, "every_layer"),
    "qwen2_moe": AttentionForm("Qwen2MoeRotaryEmbedding", "qkv_bias", False, "layer_types"),
    "qwen3_moe": AttentionForm("Qwen3MoeRotaryEmbedding", "attention_bias", "attention_bias", "every_layer_switched",
                               qk_norm=True),
}

# Keys every target config takes over unchanged from the (normalized) dense config.
COMMON_CONFIG_KEYS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "head_dim", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps", "use_cache",
    "pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings", "rope_parameters",
    "attention_dropout", "dtype",
)


@dataclass(frozen=True)
class MoEFormat:
    """A stock transformers MoE class, described as data."""

    name: str
    model_type: str
    hf_class: str
    routings: frozenset[str]
    # Dense model types whose weights fit (Qwen3-MoE alone has q/k norms); every other fact is
    # checked on the config this format would write (upcycle.dense_config.format_problem).
    accepts: frozenset[str]
    moe_prefix: str                        # where a layer's MoE tensors live
    proj_names: Mapping[str, str]          # canonical projection -> on-disk name
    shared_expert: str = "none"            # "none" | "gated": what it can express
    dense_layers: bool = False             # can some layers stay dense (mlp_only_layers)?
    # When importing a checkpoint of this format: the dense class whose attention/norms match.
    dense_model_type: str = ""
    # (dense config, spec, expert width, shared width, intermediate, dense layers, attention keys) -> config;
    # the attention keys are upcycle.dense_config.attention_keys(model_type, dense), computed by the caller.
    make_config: Callable[[dict, MoESpec, int, int, int, list[int], dict], dict] | None = None

    def layer_entries(self, layer: int, spec: MoESpec, shared_width: int) -> list[tuple[str, Role]]:
        """The on-disk names of one MoE layer's tensors, in write order, with their roles."""
        p = self.moe_prefix.format(layer=layer)
        entries: list[tuple[str, Role]] = [(f"{p}gate.weight", ("router",))]
        for e in range(spec.num_experts):
            for proj in PROJS:
                entries.append((f"{p}experts.{e}.{self.proj_names[proj]}.weight", ("expert", e, proj)))
        if self.shared_expert == "gated":
            # Qwen2-MoE always has a shared expert; width 0 expresses "none" exactly.
            for proj in PROJS:
                entries.append((f"{p}shared_expert.{proj}.weight", ("shared", proj)))
            entries.append((f"{p}shared_expert_gate.weight", ("shared_gate",)))
        return entries

    def structural_problem(self, dense_cfg: dict, spec: MoESpec) -> str | None:
        """Why this format cannot hold the MoE, from what it can express at all (dense model type,
        routing, shared experts, dense layers); None if it can. The fact-by-fact comparison of the
        config it would write is upcycle.dense_config.format_problem, which calls this first."""
        src = dense_cfg.get("model_type")
        if src not in self.accepts:
            ok = ", ".join(sorted(self.accepts))
            return f"format {self.name} takes dense models of type {ok}, not {src}"
        if spec.routing not in self.routings:
            return (f"format {self.name} cannot express routing {spec.routing} "
                    f"(it does {', '.join(sorted(self.routings))}); use --format qwen2_moe/qwen3_moe or upcycle")
        if spec.num_shared_experts and self.shared_expert == "none":
            return f"format {self.name} has no shared experts"
        if spec.num_shared_experts and self.shared_expert == "gated" and not spec.shared_expert_gate:
            return f"format {self.name} gates its shared expert by sigmoid(x.w); set moe.shared_expert_gate=true or use format upcycle"
        if spec.layers is not None and not self.dense_layers and len(spec.layers) != dense_cfg["num_hidden_layers"]:
            return f"format {self.name} makes every layer MoE; moe.layers selects a subset"
        return None


def _carry(dense: dict) -> dict:
    return {k: dense[k] for k in COMMON_CONFIG_KEYS if k in dense}


def _first_window(windows: list) -> int | None:
    return next((w for w in windows if w is not None), None)


# How a target class spells per-layer sliding windows, by AttentionForm.window: {key: value}.
WINDOW_SPELLING: dict[str, Callable[[list], dict]] = {
    "none": lambda windows: {},
    "every_layer": lambda windows: {"sliding_window": _first_window(windows)},
    "every_layer_switched": lambda windows: {"use_sliding_window": _first_window(windows) is not None,
                                             "sliding_window": _first_window(windows)},
    "layer_types": lambda windows: {
        "use_sliding_window": _first_window(windows) is not None, "sliding_window": _first_window(windows),
        "layer_types": ["full_attention" if w is None else "sliding_attention" for w in windows]},
}


def _mixtral_config(dense: dict, spec: MoESpec, expert_width: int, shared_width: int, intermediate: int,
                    dense_layers: list[int], attention: dict) -> dict:
    cfg = _carry(dense)
    cfg.update(
        model_type="mixtral", architectures=["MixtralForCausalLM"],
        intermediate_size=expert_width, num_local_experts=spec.num_experts, num_experts_per_tok=spec.top_k,
        router_aux_loss_coef=spec.aux_loss_coef,
        # Mixtral's jitter also scales the experts' input; upcycle's jitter is a training option only.
        router_jitter_noise=0.0, output_router_logits=False,
        **attention,
    )
    return cfg


def _qwen_moe_config(model_type: str, arch: str) -> Callable:
    def make(dense: dict, spec: MoESpec, expert_width: int, shared_width: int, intermediate: int,
             dense_layers: list[int], attention: dict) -> dict:
        cfg = _carry(dense)
        cfg.update(
            model_type=model_type, architectures=[arch],
            intermediate_size=intermediate, moe_intermediate_size=expert_width,
            num_experts=spec.num_experts, num_experts_per_tok=spec.top_k,
            norm_topk_prob=spec.routing != "softmax_topk",
            decoder_sparse_step=1, mlp_only_layers=dense_layers,
            router_aux_loss_coef=spec.aux_loss_coef, output_router_logits=False,
            **attention,
        )
        if "max_window_layers" in dense and "layer_types" in cfg:
            cfg["max_window_layers"] = dense["max_window_layers"]  # informational: layer_types decides
        if model_type == "qwen2_moe":
            cfg["shared_expert_intermediate_size"] = shared_width
        return cfg

    return make


MOE_FORMATS: dict[str, MoEFormat] = {
    f.name: f
    for f in [
        MoEFormat(
            name="mixtral", model_type="mixtral", hf_class="MixtralForCausalLM",
            routings=frozenset({"topk_softmax", "softmax_topk_renorm"}),
            accepts=frozenset({"llama", "mistral"}),
            moe_prefix="model.layers.{layer}.block_sparse_moe.",
            proj_names={"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"},
            dense_model_type="mistral", make_config=_mixtral_config,
        ),
        MoEFormat(
            name="qwen2_moe", model_type="qwen2_moe", hf_class="Qwen2MoeForCausalLM",
            routings=frozenset({"topk_softmax", "softmax_topk_renorm", "softmax_topk"}),
            accepts=frozenset({"llama", "mistral", "qwen2"}),
            moe_prefix="model.layers.{layer}.mlp.",
            proj_names={p: p for p in PROJS}, shared_expert="gated", dense_layers=True,
            dense_model_type="qwen2", make_config=_qwen_moe_config("qwen2_moe", "Qwen2MoeForCausalLM"),
        ),
        MoEFormat(
            name="qwen3_moe", model_type="qwen3_moe", hf_class="Qwen3MoeForCausalLM",
            routings=frozenset({"topk_softmax", "softmax_topk_renorm", "softmax_topk"}),
            accepts=frozenset({"qwen3"}),
            moe_prefix="model.layers.{layer}.mlp.",
            proj_names={p: p for p in PROJS}, dense_layers=True,
            dense_model_type="qwen3", make_config=_qwen_moe_config("qwen3_moe", "Qwen3MoeForCausalLM"),
        ),
    ]
}

# The toolkit's own format: every configuration, loaded back with `upcycle.load_moe`.
OWN_FORMAT = "upcycle"
FORMAT_PREFERENCE = ("mixtral", "qwen3_moe", "qwen2_moe")
FORMAT_BY_MODEL_TYPE = {f.model_type: f for f in MOE_FORMATS.values()}


def dense_architecture(model_type: str | None) -> DenseArchitecture | None:
    return DENSE_ARCHITECTURES.get(model_type or "")


def routing_is_renormalized(routing: Routing) -> bool:
    return routing != "softmax_topk"
