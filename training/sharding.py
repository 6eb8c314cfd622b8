"""FSDP2 sharding of a language model over the ranks (`--shard fsdp`), and its full-state checkpoints.

Under DDP every rank holds the whole frozen base; `torch.distributed.fsdp.fully_shard` instead splits every
parameter (frozen base, LoRA and projectors alike) into one slice per rank and gathers a decoder layer's
parameters only while that layer runs, so a 7B base need not fit on one GPU beside its activations. Each
decoder layer is its own unit (gathered and freed in turn) and the root module holds the rest (embeddings,
final norm, head, projectors). The optimiser must be built after `shard` (it replaces the parameters with
sharded DTensors), and gradient clipping works on those DTensors as it does on tensors.

Checkpoints stay in the unsharded format of one process: `full_state` gathers the trainable weights and the
optimiser state onto rank 0's CPU (frozen parameters are left out), and `load_full_state` slices a full
state read by every rank back onto its shard. FSDP averages the gradients over the ranks, as DDP does.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

_GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)


def decoder_layers(llm: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a (PEFT-wrapped) Hugging Face LM: the classes it names `_no_split_modules`."""
    base = llm.get_base_model() if hasattr(llm, "get_base_model") else llm
    names = set(getattr(base, "_no_split_modules", None) or ())
    layers = [m for m in base.modules() if type(m).__name__ in names]
    if not layers:
        raise RuntimeError(f"FSDP: no decoder layers ({sorted(names) or 'no _no_split_modules'}) in {type(base)}")
    return layers


def shard(root: nn.Module, llm: nn.Module) -> nn.Module:
    """Shard `root` (whose forward computes the whole loss) over the ranks: each decoder layer of `llm`, then
    the rest. `root`'s parameters become DTensors in place; build the optimiser afterwards."""
    for layer in decoder_layers(llm):
        fully_shard(layer)
    fully_shard(root)
    # Ranks may use different parameters (an eye without OCT leaves the OCT projector idle): every rank must
    # then still enter each reduce-scatter, with zeros for what it did not use (DDP's find_unused_parameters).
    root.set_reduce_scatter_unused_params(True)
    return root


def drop_idle_grads(params: list[nn.Parameter]) -> None:
    """Set to None the gradients that are exactly zero on every rank: parameters no rank used this step.

    One process leaves an unused parameter's gradient None, and AdamW then neither moves it nor advances its
    moments; FSDP hands it zeros instead (`shard`), which AdamW would apply. Only for parameters whose use
    depends on the data (the projectors): a LoRA A matrix has an exactly zero gradient while B is still zero.
    """
    if not params:
        return
    flags = []
    for p in params:
        grad = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
        flags.append(grad.ne(0).any() if grad is not None else torch.zeros((), dtype=torch.bool, device=p.device))
    used = torch.stack(flags).float()  # on the parameters' device, as NCCL needs
    dist.all_reduce(used)
    for p, count in zip(params, used.tolist(), strict=True):
        if count == 0:
            p.grad = None


def accumulate(module: nn.Module, last: bool) -> AbstractContextManager[Any]:
    """Context for one micro-batch's backward in an accumulation window: DDP skips the gradient exchange but on
    the `last`; FSDP reduce-scatters every micro-batch (the sharded gradients accumulate, so memory stays sharded)."""
    if last or isinstance(module, FSDPModule):
        return nullcontext()
    return module.no_sync()


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(trainable weights by name, `optimizer.state_dict()`-shaped state keyed by parameter index), unsharded on
    rank 0's CPU; other ranks get empty dicts. Every rank must call it (it gathers)."""
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    # a tied frozen weight (lm_head = embed_tokens) escapes ignore_frozen_params under its second name
    weights = {k: v for k, v in get_model_state_dict(model, options=_GATHER).items() if k in trainable}
    named = get_optimizer_state_dict(model, optimizer, options=_GATHER)
    if not named:
        return weights, {}
    index = {fqn: i for i, fqn in enumerate(fqn for g in named["param_groups"] for fqn in g["params"])}
    state = {index[fqn]: values for fqn, values in named["state"].items()}
    groups = [{**g, "params": [index[fqn] for fqn in g["params"]]} for g in named["param_groups"]]
    return weights, {"state": state, "param_groups": groups}


def load_full_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, weights: dict[str, torch.Tensor], state: dict[str, Any]
) -> None:
    """Slice a full state (as `full_state` returns it, read by every rank) onto this rank's shards."""
    names = {id(p): name for name, p in model.named_parameters()}
    fqns = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    # The torch loader knows only the keys a fresh optimiser's groups have; the scheduler's `initial_lr` (and
    # any other saved hyper-parameter) is set on the groups afterwards, as Optimizer.load_state_dict would.
    fresh = [set(g) for g in optimizer.param_groups]
    groups = [
        {**{k: v for k, v in g.items() if k in keys}, "params": [fqns[int(i)] for i in g["params"]]}
        for g, keys in zip(state["param_groups"], fresh, strict=True)
    ]
    named = {"state": {fqns[int(i)]: values for i, values in state["state"].items()}, "param_groups": groups}
    options = StateDictOptions(full_state_dict=True, strict=False)  # the frozen base is not in a checkpoint
    set_model_state_dict(model, weights, options=options)
    set_optimizer_state_dict(model, optimizer, named, options=options)
    for group, saved in zip(optimizer.param_groups, state["param_groups"], strict=True):
        group.update({k: v for k, v in saved.items() if k != "params"})
    # The torch loader first gives every parameter a state (a zero step); one that had none (never used) must
    # have none again, or its first update would count from step 1 instead of 0.
    held = {int(i) for i in state["state"]}
    for i, param in enumerate(p for g in optimizer.param_groups for p in g["params"]):
        if i not in held:
            optimizer.state.pop(param, None)
