"""A rank's Megatron tensors under their global names, with what parallelism applies to each.

Mappings speak global names: layer and expert indices as if there were no pipeline or expert
parallelism. This module is the one place that translates a rank's local module names.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from bridgecore.mapping import Shard

_DECODER_LAYER = re.compile(r"(^|\.)decoder\.layers\.(\d+)\.")
_MTP_LAYER = re.compile(r"(^|\.)mtp\.layers\.(\d+)\.")
# megatron-core 0.19 renamed the MTP layer's inner layer `transformer_layer` -> `mtp_model_layer`
# but still writes GPT MTP checkpoints under the old name; global names follow the checkpoint.
_MTP_INNER_LAYER = re.compile(r"(^|\.)(mtp\.layers\.\d+\.)mtp_model_layer\.")
_LOCAL_EXPERT = re.compile(r"\.experts\.local_experts\.(\d+)\.")
_GROUPED_EXPERT = re.compile(r"\.experts\.(linear_fc[12])\.(weight|bias)(\d+)$")


@dataclass
class LocalTensor:
    """One parameter or persistent buffer of this rank."""

    name: str
    local_name: str
    tensor: torch.Tensor
    expert: bool
    #: the TP (or expert-TP) partition this rank holds; size 1 when the tensor is not partitioned.
    shard: Shard
    partition_dim: int | None
    group: Any
    #: whether this rank writes the tensor on export (one writer per replica set).
    writer: bool
    #: the index of the model chunk (virtual pipeline stage) that holds it.
    chunk: int = 0


def global_name(local: str, layer_offset: int, mtp_offset: int, expert_offset: int) -> str:
    name = _DECODER_LAYER.sub(lambda m: f"{m.group(1)}decoder.layers.{int(m.group(2)) + layer_offset}.", local)
    name = _MTP_LAYER.sub(lambda m: f"{m.group(1)}mtp.layers.{int(m.group(2)) + mtp_offset}.", name)
    name = _MTP_INNER_LAYER.sub(r"\1\2transformer_layer.", name)
    name = _LOCAL_EXPERT.sub(lambda m: f".experts.local_experts.{int(m.group(1)) + expert_offset}.", name)
    return _GROUPED_EXPERT.sub(lambda m: f".experts.{m.group(1)}.{m.group(2)}{int(m.group(3)) + expert_offset}", name)


def _named_tensors(module: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor, int | None]]:
    """Params and persistent buffers with the dim megatron-core splits them along over TP.

    The dim comes from the module class, as megatron-core's own sharded state dict does: the
    ``tensor_model_parallel`` attributes are only set when megatron initialises the weights itself.
    """
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding

    for mod_name, mod in module.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        for name, param in mod.named_parameters(recurse=False):
            if isinstance(mod, (ColumnParallelLinear, VocabParallelEmbedding)) and name in ("weight", "bias"):
                dim = 0
            elif isinstance(mod, RowParallelLinear) and name in ("weight", "bias"):
                dim = 1 if name == "weight" else None
            else:
                dim = _declared_dim(param)
            yield prefix + name, param, dim
        for name, buf in mod.named_buffers(recurse=False):
            if buf is not None and name not in mod._non_persistent_buffers_set:
                yield prefix + name, buf, _declared_dim(buf)


def _declared_dim(tensor: torch.Tensor) -> int | None:
    """The split a module declared itself with megatron's attributes (e.g. per-channel quantizer state)."""
    return getattr(tensor, "partition_dim", None) if getattr(tensor, "tensor_model_parallel", False) else None


def local_tensors(chunks: list[torch.nn.Module], config: Any) -> list[LocalTensor]:
    """Every parameter and persistent buffer of this rank's model chunks (one per virtual stage)."""
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.multi_token_prediction import get_mtp_layer_offset
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    tp = Shard(ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size())
    etp = Shard(ps.get_expert_tensor_parallel_rank(), ps.get_expert_tensor_parallel_world_size())
    ep_rank, ep_size = ps.get_expert_model_parallel_rank(), ps.get_expert_model_parallel_world_size()
    experts = config.num_moe_experts or 0
    expert_offset = ep_rank * (experts // ep_size) if experts else 0
    dense_writer = tp.rank == 0 and ps.get_data_parallel_rank() == 0
    expert_writer = etp.rank == 0 and ps.get_expert_data_parallel_rank() == 0

    out = []
    for vp_stage, chunk in enumerate(chunks):
        stage = vp_stage if len(chunks) > 1 else None
        layer_offset = get_transformer_layer_offset(config, vp_stage=stage)
        mtp_offset = get_mtp_layer_offset(config, vp_stage=stage)
        for local, tensor, dim in _named_tensors(chunk):
            is_expert = ".experts." in local
            partitioned = dim is not None
            shard = (etp if is_expert else tp) if partitioned else Shard()
            group = (
                (ps.get_expert_tensor_parallel_group() if is_expert else ps.get_tensor_model_parallel_group())
                if partitioned
                else None
            )
            out.append(
                LocalTensor(
                    name=global_name(local, layer_offset, mtp_offset, expert_offset),
                    local_name=local,
                    tensor=tensor,
                    expert=is_expert,
                    shard=shard,
                    partition_dim=dim,
                    group=group,
                    writer=expert_writer if is_expert else dense_writer,
                    chunk=vp_stage,
                )
            )
    return out


def gathered(t: LocalTensor, meta: bool) -> list[torch.Tensor]:
    """``t`` as every rank of its TP group holds it, in rank order (gathered; empty ones when ``meta``)."""
    if meta:
        return [torch.empty(t.tensor.shape, dtype=t.tensor.dtype, device="meta")] * t.shard.size
    if t.shard.size == 1:
        return [t.tensor]
    shards = [torch.empty_like(t.tensor) for _ in range(t.shard.size)]
    dist.all_gather(shards, t.tensor.contiguous(), group=t.group)
    return shards


def whole(t: LocalTensor, meta: bool) -> torch.Tensor:
    """``t`` whole: its TP shards joined along the dim they split."""
    shards = gathered(t, meta)
    return shards[0] if len(shards) == 1 else torch.cat(shards, dim=t.partition_dim)
