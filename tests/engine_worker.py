"""Run under torchrun by tests/test_engines.py: a few Trainer steps of a tiny upcycled MoE under one engine.

    python -m torch.distributed.run --nproc_per_node 2 tests/engine_worker.py ddp|fsdp|zero2|zero3 OUT

Rank 0 writes OUT/result.pt: the logged losses, the model's full state dict after training, and the
class names the engine wrapped the model and its decoder layers in. FSDP: accelerate turns FSDP on
only for GPU runs (train/engine.py, engine_problems), so on CPU this script sets accelerate's shared
state to FSDP itself before the Trainer is made; everything after that is the Trainer's own FSDP2 path.
"""

import json
import sys
from pathlib import Path

import torch

from upcycle.config import MoESpec, TrainSpec
from upcycle.moe.model import upcycle_model
from upcycle.tiny import tiny_model
from upcycle.train.engine import fsdp_arguments, training_arguments


def dataset(rows: int = 16, length: int = 12):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(6, 100, (rows, length), generator=g)
    return [{"input_ids": r, "labels": r, "attention_mask": torch.ones_like(r)} for r in ids]


def main(mode: str, out: Path) -> None:
    from transformers import Trainer

    zero = {"zero2": 2, "zero3": 3}.get(mode)
    deepspeed = None
    if zero:
        deepspeed = str(out / f"ds_zero{zero}.json")
        Path(deepspeed).write_text(json.dumps({
            # threshold 0: ZeRO-3 would otherwise keep every parameter of this tiny model whole
            "zero_optimization": {"stage": zero, "stage3_gather_16bit_weights_on_model_save": True,
                                  "stage3_param_persistence_threshold": 0},
            "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto", "train_batch_size": "auto", "gradient_clipping": "auto"}))
    train = TrainSpec(lr=3e-3, warmup_ratio=0, batch_size=2, epochs=1, sampler="sequential", logging_steps=1,
                      precision="fp32", deepspeed=deepspeed)
    model = upcycle_model(tiny_model("llama", 0), MoESpec(num_experts=4, top_k=2, aux_loss_coef=0.1))
    fsdp = fsdp_arguments(train.model_copy(update={"fsdp": "full_shard auto_wrap"})) if mode == "fsdp" else {}
    args = training_arguments(train, out / "trainer", 0, moe=True, progress=False, **fsdp)
    if fsdp:
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState, PartialState
        from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

        Accelerator()  # initializes the shared state (as MULTI_CPU), which the Trainer's Accelerator reuses
        for state in (AcceleratorState._shared_state, PartialState._shared_state):
            state["distributed_type"] = DistributedType.FSDP
        AcceleratorState._shared_state["fsdp_plugin"] = FullyShardedDataParallelPlugin(**args.fsdp_plugin_args)
    trainer = Trainer(model=model, args=args, train_dataset=dataset())
    trainer.train()
    state = trainer.accelerator.get_state_dict(trainer.model_wrapped)  # a collective: every rank calls it
    if trainer.is_world_process_zero():
        layer = trainer.model.model.layers[0]
        torch.save({"losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
                    "state": {k: v.detach().float().cpu() for k, v in state.items()},
                    "wrapped": type(trainer.model_wrapped).__name__, "layer": type(layer).__name__,
                    "mlp": type(layer.mlp).__name__, "router_numel_here": local_numel(layer.mlp.router.weight)},
                   out / "result.pt")


def local_numel(param) -> int:
    """Elements of `param` this rank holds: fewer than the whole when the engine shards parameters."""
    return param.to_local().numel() if hasattr(param, "to_local") else param.numel()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
