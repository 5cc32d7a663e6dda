"""A tiny Megatron-LM training checkpoint, saved the way ``megatron/training/checkpointing.py`` saves one.

Megatron-LM's ``save_checkpoint`` (``--ckpt-format torch_dist``) builds one state dict with
``generate_state_dict``: ``args`` (the run's argparse Namespace), ``checkpoint_version`` 3.0,
``iteration``, the model as ``model`` (or ``model0``, ``model1``, ... with virtual pipeline stages),
each chunk's ``sharded_state_dict`` under the metadata ``_build_sharded_state_dict_metadata`` makes,
the optimizer's ``sharded_state_dict`` over that model state, ``opt_param_scheduler``, ``rng_state``
as a ShardedObject over (PP, TP) with the data-parallel rank as replica, and
``num_floating_point_operations_so_far``. It saves that with ``dist_checkpointing.save`` into
``iter_{iteration:07d}/`` and then writes the iteration number into
``latest_checkpointed_iteration.txt``. This module does the same with megatron-core's own classes:
the model a run would start from (the HF checkpoint converted by bridgecore, as ``import`` and
``--load`` give it), megatron-core's ``FP32Optimizer`` around torch's Adam after one step (so
``exp_avg``/``exp_avg_sq`` exist for every param; the learning rate is 0, so the weights stay those
of the HF checkpoint and an export can be compared with it bit for bit). The optimizer is the one
Megatron-LM uses for fp32 training without ``--use-distributed-optimizer``: its mixed-precision and
distributed optimizers need CUDA.

Run under torchrun (gloo): ``python megatron_lm.py HF_DIR OUT_DIR --iteration N --tp 2 --pp 2 --vpp 2``
(see ``--help``), or call :func:`save_training_checkpoint` in a process group of that size.
"""

from __future__ import annotations

import argparse
import contextlib
import random
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from bridgecore import AutoBridge
from bridgecore.megatron import parallel
from bridgecore.megatron.compat import cpu_compat
from bridgecore.megatron.state import unused_output_weights_hidden

TRACKER = "latest_checkpointed_iteration.txt"


def run_args(bridge: AutoBridge, layout: parallel.Layout, iteration: int, save: Path) -> argparse.Namespace:
    """The parts of Megatron-LM's ``args`` a checkpoint reader looks at, with the types it saves them in."""
    from megatron.core.transformer.enums import AttnBackend

    c = bridge.config
    return argparse.Namespace(
        num_layers=c.num_layers,
        hidden_size=c.hidden_size,
        ffn_hidden_size=c.ffn_hidden_size,
        num_attention_heads=c.num_attention_heads,
        group_query_attention=c.num_query_groups != c.num_attention_heads,
        num_query_groups=c.num_query_groups,
        kv_channels=c.kv_channels,
        num_experts=c.num_moe_experts,
        moe_ffn_hidden_size=c.moe_ffn_hidden_size,
        mtp_num_layers=c.mtp_num_layers,
        padded_vocab_size=c.vocab_size,
        **layout.megatron_sizes(),
        params_dtype=c.params_dtype,
        bf16=False,
        fp16=False,
        transformer_impl="local",
        attention_backend=AttnBackend.auto,
        ckpt_format="torch_dist",
        use_distributed_optimizer=False,
        no_save_optim=False,
        no_save_rng=False,
        save=str(save),
        load=None,
        iteration=iteration,
        lr=0.0,
        seed=1234,
    )


def _rng_state(layout: parallel.Layout):
    """``get_rng_state`` for torch_dist: one ShardedObject per (PP, TP) rank, the DP rank its replica."""
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    state = {
        "random_rng_state": random.getstate(),
        "np_rng_state": np.random.get_state(),
        "torch_rng_state": torch.get_rng_state(),
        # A CPU run has no CUDA generator; its slot holds the CPU generator's state in the same format.
        "cuda_rng_state": torch.get_rng_state(),
        "rng_tracker_states": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    return ShardedObject(
        "rng_state",
        [state],
        (layout.pp, layout.tp),
        (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()),
        replica_id=ps.get_data_parallel_rank(with_context_parallel=True),
    )


def _optimizer(model: list[torch.nn.Module]):
    """megatron-core's FP32Optimizer over Adam, after one step with random gradients and lr 0."""
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.optimizer.optimizer import FP32Optimizer, MegatronOptimizer

    class CpuFP32Optimizer(FP32Optimizer):
        """FP32Optimizer with its loss scale (1.0, unused in fp32) on the CPU; its constructor puts it on CUDA."""

        def __init__(self, optimizer: torch.optim.Optimizer, config: OptimizerConfig):
            MegatronOptimizer.__init__(self, optimizer, config, lambda *_: None)
            self._scale = torch.tensor([1.0])
            self.is_stub_optimizer = False

    params = [p for chunk in model for p in chunk.parameters()]
    generator = torch.Generator().manual_seed(parallel.rank())
    for p in params:
        p.requires_grad_(True)
        p.grad = torch.randn(p.shape, generator=generator).to(p.dtype)
    config = OptimizerConfig(optimizer="adam", lr=0.0, weight_decay=0.0, clip_grad=0.0, params_dtype=torch.float32)
    adam = torch.optim.Adam(params, lr=0.0, weight_decay=0.0)
    optimizer = CpuFP32Optimizer(adam, config)
    adam.step()
    return optimizer


def save_training_checkpoint(
    hf_dir: Path, out: Path, iteration: int, layout: parallel.Layout, model_prefix: str = "", with_model: bool = True
) -> None:
    """Every rank: convert ``hf_dir`` at ``layout``, then save iteration ``iteration`` into ``out``.

    ``model_prefix`` renames the model's sharded keys as a model nested in another saves them (a
    multimodal model's ``language_model.``); ``with_model=False`` leaves the model out (optimizer,
    RNG state and args only)."""
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.utils import replace_prefix_for_sharding

    # fp32 params (Megatron-LM without --bf16): the bf16 HF weights convert exactly.
    bridge = AutoBridge.from_hf_pretrained(hf_dir, params_dtype=torch.float32, plugin=None)
    model = bridge.to_megatron_model(layout)
    metadata = {
        "singleton_local_shards": False,
        "chained_optim_avoid_prefix": True,
        "dp_cp_group": ps.get_data_parallel_group(with_context_parallel=True),
    }
    state = {"args": run_args(bridge, layout, iteration, out), "checkpoint_version": 3.0, "iteration": iteration}
    with cpu_compat(), contextlib.ExitStack() as hidden:
        # the output weight an MTP stage never reads is left out of the model's state and the optimizer's
        for chunk in model:
            hidden.enter_context(unused_output_weights_hidden(chunk))
        optimizer = _optimizer(model)
        for i, chunk in enumerate(model):
            state["model" if len(model) == 1 else f"model{i}"] = chunk.sharded_state_dict(metadata=metadata)
        state["optimizer"] = optimizer.sharded_state_dict(state, metadata=metadata)
        for key in [k for k in state if k.startswith("model")]:
            if not with_model:
                del state[key]
            elif model_prefix:
                replace_prefix_for_sharding(state[key], "", model_prefix)
        state["opt_param_scheduler"] = {"max_lr": 0.0, "min_lr": 0.0, "num_steps": iteration, "warmup_steps": 0}
        state["rng_state"] = _rng_state(layout)
        state["num_floating_point_operations_so_far"] = 0
        checkpoint = out / f"iter_{iteration:07d}"
        if parallel.rank() == 0:
            checkpoint.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        content = {k: v for k, v in metadata.items() if k != "dp_cp_group"}
        dist_checkpointing.save(state, str(checkpoint), content_metadata=content)
    dist.barrier()
    if parallel.rank() == 0:
        (out / TRACKER).write_text(str(iteration))


if __name__ == "__main__":
    cli = argparse.ArgumentParser(description="save a tiny Megatron-LM training checkpoint (run under torchrun)")
    cli.add_argument("hf_dir", type=Path)
    cli.add_argument("out", type=Path)
    cli.add_argument("--iteration", type=int, default=100)
    for flag in ("tp", "pp", "ep"):
        cli.add_argument(f"--{flag}", type=int, default=1)
    cli.add_argument("--vpp", type=int, default=None)
    cli.add_argument("--model-prefix", default="")
    cli.add_argument("--no-model", action="store_true")
    given = cli.parse_args()
    parallel.init_distributed()
    layout = parallel.Layout(tp=given.tp, pp=given.pp, vpp=given.vpp, ep=given.ep)
    save_training_checkpoint(
        given.hf_dir, given.out, given.iteration, layout, model_prefix=given.model_prefix, with_model=not given.no_model
    )
    dist.barrier()
