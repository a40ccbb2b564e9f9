"""The model card (README.md) written into every exported folder, since users publish these as they are.

The card opens with the Hugging Face hub's YAML front matter (base_model, library_name,
pipeline_tag, tags, and the license carried from the base's own card) and says what the model is
(method, experts, top-k, routing, init, format), what made it (stages, data) when the caller knows,
the scores when they were measured, and how to load it. `model_card(facts)` is a pure function of
`CardFacts` (export/save.py writes it into every MoE folder before the atomic rename);
`base_identity` reads the two facts that come from the base folder; `merge_card` is the card of an
`upcycle merge` output (models, weights, configuration, as mergekit's card has).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

# A hub repository id ("owner/name"); a local path has a leading / . ~ or more than one slash.
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Keys of the base's front matter that hold for the upcycled model too.
CARRIED_KEYS = ("license", "license_name", "license_link", "language")
FRONT_MATTER = re.compile(r"\A---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(\r?\n|\Z)", re.S)

# method -> (hub tag, name, reference)
METHODS: dict[str, tuple[str, str, str]] = {
    "upit": ("upit", "UpIT (Upcycling Instruction Tuning)", "https://arxiv.org/abs/2410.01610"),
    "sparse_upcycling": ("sparse-upcycling", "sparse upcycling", "https://arxiv.org/abs/2212.05055"),
    "virtual_group": ("virtual-group-upcycling", "fine-grained upcycling with virtual groups",
                      "https://arxiv.org/abs/2410.07524"),
    "drop_upcycling": ("drop-upcycling", "Drop-Upcycling", "https://arxiv.org/abs/2502.19261"),
    "lora_experts": ("lora-experts", "LoRA experts on the frozen dense MLP (LoRAMoE-style)", ""),
    "mix": ("moe-merge", "experts trained apart (fine-tunes or LoRA adapters of one base), then mixed", ""),
    "btx": ("branch-train-mix", "Branch-Train-MiX", "https://arxiv.org/abs/2403.07816"),
    "self_moe": ("self-moe", "Self-MoE (LoRA experts per domain, mixed with a router)", "https://arxiv.org/abs/2406.12034"),
}
# init method -> the upcycling method it implements (UpIT is named by its caller)
METHOD_OF_INIT = {"copy": "sparse_upcycling", "noise": "sparse_upcycling", "virtual_group": "virtual_group",
                  "drop": "drop_upcycling"}
ROUTINGS = {
    "topk_softmax": "softmax over the top-k router logits (Mixtral's routing)",
    "softmax_topk_renorm": "softmax over all experts, top-k kept and renormalized to sum to 1",
    "softmax_topk": "softmax over all experts, top-k kept without renormalization (NVIDIA's routing)",
}


@dataclass
class CardFacts:
    """What the card says. The exporter knows the shape and format; its caller knows how it was made."""

    name: str                                 # the folder's name, the card's title
    spec: dict                                # MoESpec, as model_dump(mode="json")
    format: str                               # mixtral | qwen2_moe | qwen3_moe | upcycle
    model_class: str | None                   # the stock class (None for upcycle's own format)
    moe_layers: int
    num_layers: int
    parameters: dict                          # {"total": n, "active": n}
    dtype: str
    base_model: str | None = None             # hub id, else the base folder's name
    base_revision: str | None = None          # the hub commit of the base, when it came from the hub
    base_card: dict = field(default_factory=dict)  # CARRIED_KEYS from the base's front matter
    method: str | None = None                 # a key of METHODS; None: derived from init
    init: dict | None = None                  # InitSpec, as model_dump(mode="json")
    stages: list[str] = field(default_factory=list)  # one line per stage that made the model
    data: list[str] = field(default_factory=list)    # training data, as configured
    scores: dict | None = None                # {task: score} when measured
    tool: str = "upcycle"                     # the command that wrote the folder
    compact_base: str | None = None           # compact LoRA storage: the dense model it loads onto (name, fingerprint)


def read_front_matter(readme: Path) -> dict:
    """The YAML front matter of a model card, or {} when there is none or it does not parse."""
    try:
        match = FRONT_MATTER.match(readme.read_text(encoding="utf-8"))
        meta = yaml.safe_load(match.group(1)) if match else None
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}  # a base's unreadable card is not the user's error; the license is then unknown
    return meta if isinstance(meta, dict) else {}


def base_identity(base: str | Path | None, dense_cfg: dict) -> tuple[str | None, dict]:
    """(base_model for the front matter, the carried keys of the base's card).

    base_model is the hub id when config.json's `_name_or_path` is one (checkpoints written by
    transformers 4 carry it), or the model the base's card says it is a quantized copy of (the
    bundled SmolLM2), else the base folder's name.
    """
    from upcycle.models import hub_repo_of

    name_or_path = str(dense_cfg.get("_name_or_path") or "")
    folder = Path(base) if base else (Path(name_or_path) if name_or_path and Path(name_or_path).is_dir() else None)
    meta = read_front_matter(folder / "README.md") if folder is not None and (folder / "README.md").is_file() else {}
    upstream = meta.get("base_model") if meta.get("base_model_relation") == "quantized" else None
    cached = hub_repo_of(folder) if folder is not None else None
    if cached:  # a snapshot in the Hugging Face cache: its hub id, never the cache path
        base_model = cached[0]
    elif HUB_ID.match(name_or_path) and not Path(name_or_path).exists():
        base_model = name_or_path
    elif isinstance(upstream, str) and HUB_ID.match(upstream):
        base_model = upstream
    else:
        base_model = folder.resolve().name if folder is not None else None
    return base_model, {k: meta[k] for k in CARRIED_KEYS if meta.get(k) not in (None, "", [])}


def method_key(facts: CardFacts) -> str | None:
    if facts.method:
        return facts.method
    if facts.spec.get("expert_type") == "lora":
        return "lora_experts"
    return METHOD_OF_INIT.get((facts.init or {}).get("method"))


def front_matter(facts: CardFacts) -> dict:
    method = method_key(facts)
    tags = ["moe", "upcycle", *([METHODS[method][0]] if method else []), facts.format]
    meta = {"base_model": facts.base_model, "library_name": "transformers", "pipeline_tag": "text-generation",
            **facts.base_card, "tags": tags}
    return {k: v for k, v in meta.items() if v is not None}


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _init_text(init: dict) -> str:
    text = init["method"]
    if init["method"] == "drop":
        text += f", drop ratio {init['drop_ratio']} ({init['drop_index_sets']} index sets)"
    if init["method"] == "noise":
        text += f", noise std {init['noise_std']}"
    if init.get("weight_scaling", "none") != "none":
        text += f", weight scaling {init['weight_scaling']}"
    return text


def model_card(facts: CardFacts) -> str:
    """The README.md text for an exported MoE folder."""
    spec = facts.spec
    method = method_key(facts)
    meta = yaml.safe_dump(front_matter(facts), sort_keys=False, allow_unicode=True).strip()
    base = facts.base_model or "a dense model"
    if facts.base_model and HUB_ID.match(facts.base_model):
        base = f"[{facts.base_model}](https://huggingface.co/{facts.base_model})"
        if facts.base_revision:
            base += f" (commit `{facts.base_revision[:12]}`)"
    how = ""
    if method:
        _, title, ref = METHODS[method]
        how = f" by {f'[{title}]({ref})' if ref else title}"
    lines = [f"---\n{meta}\n---", f"# {facts.name}", "",
             f"A Mixture-of-Experts language model upcycled from {base}{how}, written by `{facts.tool}`.",
             "", "## Model", "", "| | |", "| --- | --- |"]
    rows = [*([("method", METHODS[method][1])] if method else []),
            ("experts", f"{spec['num_experts']} routed per MoE layer"
                        + (f" + {spec['num_shared_experts']} shared" if spec.get("num_shared_experts") else "")),
            ("top-k", f"{spec['top_k']} expert{'s' if spec['top_k'] > 1 else ''} per token"),
            ("routing", f"{spec['routing']}: {ROUTINGS[spec['routing']]}"),
            ("granularity", f"{spec['granularity']} (each expert is 1/{spec['granularity']} of the dense MLP's width)"
                            if spec["granularity"] > 1 else "1 (each expert has the dense MLP's width)")]
    if spec["expert_type"] == "lora":
        lora = spec["lora"]
        rows.append(("experts are", f"the frozen dense MLP plus a LoRA delta each (rank {lora['rank']}, "
                                    f"alpha {lora['alpha']}, on {', '.join(lora['targets'])})"))
    if facts.init:
        rows.append(("init", _init_text(facts.init)))
    rows += [("MoE layers", f"{facts.moe_layers} of {facts.num_layers}"),
             ("parameters", f"{_count(facts.parameters['total'])} total, {_count(facts.parameters['active'])} "
                            "active per token"),
             ("format", f"`{facts.model_class}` (transformers `{facts.format}`), safetensors, {facts.dtype}"
                        if facts.model_class else f"upcycle's own format, safetensors, {facts.dtype}")]
    lines += [f"| {k} | {v} |" for k, v in rows]
    if facts.stages or facts.data:
        lines += ["", "## How it was made", ""]
        lines += [f"{i}. {s}" for i, s in enumerate(facts.stages, 1)]
        if facts.data:
            lines += ["", f"Training data: {', '.join(f'`{d}`' for d in facts.data)}."]
    if facts.scores:
        lines += ["", "## Scores", "", "| task | score |", "| --- | --- |"]
        lines += [f"| {task} | {score:.4g} |" if isinstance(score, (int, float)) else f"| {task} | {score} |"
                  for task, score in facts.scores.items()]
    lines += ["", "## How to load", ""]
    if facts.model_class:
        lines += [f"A stock `{facts.model_class}`: transformers loads it without remote code.", "", "```python",
                  "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  f'model = AutoModelForCausalLM.from_pretrained("{facts.name}")  # this folder, or its hub id',
                  f'tokenizer = AutoTokenizer.from_pretrained("{facts.name}")', "```"]
    else:
        lines += ["upcycle's own format (no stock transformers class holds this MoE exactly); load it with "
                  "upcycle installed:", "", "```python", "from upcycle import load_moe", "",
                  f'model = load_moe("{facts.name}")  # this folder', "```"]
        if facts.compact_base:
            lines += ["", "The folder holds the experts' LoRA adapters and the routers only: `load_moe` puts them "
                      f"onto the dense base they were made on (`{facts.compact_base}`, checked by fingerprint), or "
                      "the copy given as `load_moe(folder, base=DENSE_FOLDER)`."]
    return "\n".join(lines) + "\n"


# merge method -> (name, reference)
MERGE_METHODS: dict[str, tuple[str, str]] = {
    "linear": ("linear averaging", ""),
    "task_arithmetic": ("task arithmetic", "https://arxiv.org/abs/2212.04089"),
    "ties": ("TIES-Merging", "https://arxiv.org/abs/2306.01708"),
    "dare": ("DARE", "https://arxiv.org/abs/2311.03099"),
    "dare_ties": ("DARE with TIES sign consensus", "https://arxiv.org/abs/2311.03099"),
}


def merge_card(cfg, folders: list, base_folder=None) -> str:
    """The README.md text for an `upcycle merge` output (a MergeConfig, the models' ModelFolders, the base's).

    mergekit's card lists the models and the configuration; so does this one. The license is the
    reference model's (the base, else the first model), whose config and tokenizer the merge keeps.
    """
    base = base_identity(base_folder.path, base_folder.config) if base_folder else None
    models = [base_identity(f.path, f.config) for f in folders]
    carried = (base or models[0])[1]
    title, ref = MERGE_METHODS[cfg.method]
    name = Path(cfg.out).name
    meta = {"base_model": [i[0] for i in ([base] if base else []) + models], "library_name": "transformers",
            "pipeline_tag": "text-generation", **carried, "tags": ["merge", "upcycle", cfg.method.replace("_", "-")]}
    config = cfg.model_dump(mode="json", by_alias=True, exclude={"out", "force"})
    method = f"[{title}]({ref})" if ref else title
    lines = [f"---\n{yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).strip()}\n---", f"# {name}", "",
             f"A merge of {len(folders)} models by {method}, written by `upcycle merge`"
             + (f", with `{base[0]}` as the base." if base else "."), "", "## Models merged", ""]
    lines += [f"- `{model_id}` (weight {m.weight:g})" for (model_id, _), m in zip(models, cfg.models)]
    lines += ["", "## Configuration", "", "```yaml", yaml.safe_dump(config, sort_keys=False).strip(), "```",
              "", "## How to load", "", "```python", "from transformers import AutoModelForCausalLM", "",
              f'model = AutoModelForCausalLM.from_pretrained("{name}")  # this folder, or its hub id', "```"]
    return "\n".join(lines) + "\n"
