"""How a task's trained module runs across processes: the one seam for DDP and FSDP2.

A task builds its plain module, then wraps it once: `Parallel(model, world, device, kind=train.parallel, ...)`.
The task trains through `forward` (DDP or FSDP2 under torchrun, optionally torch.compile'd) and reaches the
module only through the methods below, so the way it is sharded changes this file alone:

    forward(x, ...)            the training forward pass (the gradients are averaged over the ranks in backward)
    parameters()               what the optimizer steps: the module's, or under FSDP this rank's shards of them
    no_sync(skip)              skip the gradient reduction of a micro-batch that is not the last
    clip_grad_norm(max_norm)   the total gradient norm of the averaged gradients, clipped to max_norm
    after_step()               after an optimizer step: FSDP gathers the updated shards into the plain module
    full_state_dict()          the whole module's weights (checkpoints, exports)
    load_full_state_dict(...)  load them back, with an error listing mismatched keys and shapes
    optimizer_state_dict(opt)  the optimizer's state for a checkpoint (FSDP: gathered, keyed by parameter name)
    load_optimizer_state_dict  load it back, from a checkpoint of either kind
    unwrap()                   the plain module (EMAs, sampling, grids, validation, exports)

train.parallel=ddp (the default): DDP broadcasts rank 0's weights and all-reduces the gradients; each rank holds
the whole module, its gradients and its AdamW state. train.parallel=fsdp: FSDP2 (`fully_shard`) shards a copy
of the module per block (each entry of its top-level nn.ModuleLists: DiT blocks, UNet levels), then the root, so
each rank keeps 1/W of the gradients and of the AdamW state; the gradients are reduce-scattered in fp32
(`MixedPrecisionPolicy(param_dtype=train.precision, reduce_dtype=float32)`). The plain module stays whole on every
rank, refreshed by one all-gather per optimizer step, so the EMAs, grids and evaluation run unsharded on rank 0
as under DDP. train.activation_checkpointing recomputes each block's activations in backward.

With one process nothing is wrapped: `forward` is the module itself (or its compiled form).
"""

from __future__ import annotations

import contextlib
import copy
import functools

import torch
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint

from difftrain.checkpoint import CheckpointError, load_model_state
from difftrain.training.distributed import World

PARALLEL = ("ddp", "fsdp")  # train.parallel


def blocks(model: nn.Module) -> list[nn.Module]:
    """The model's blocks, the units FSDP shards and activation checkpointing recomputes: every entry of its
    top-level nn.ModuleLists (DiT: blocks; ADM UNet: input and output levels; DDPM UNet: downs, ups, attention)."""
    return [block for child in model.children() if isinstance(child, nn.ModuleList) for block in child]


def checkpoint_activations(model: nn.Module) -> None:
    """Each block keeps only its inputs in the forward pass and recomputes the rest in backward."""
    for block in blocks(model):
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def shard(model: nn.Module, param_dtype: torch.dtype | None) -> FSDPModule:
    """FSDP2 over `model` in place: each block its own unit, then the root (the rest: embeddings, final layer)."""
    # The inputs keep their dtype (cast_forward_inputs=False): the timesteps and the RoPE tables stay fp32, as under
    # DDP, where autocast alone decides which ops run in train.precision (it casts the bf16 weights' inputs too).
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
    for p in model.parameters():  # FSDP2 shards contiguous tensors only (train.channels_last makes convs' strided)
        p.data = p.data.contiguous()
    for block in blocks(model):
        fully_shard(block, mp_policy=policy)
    return fully_shard(model, mp_policy=policy)


@contextlib.contextmanager
def no_gradient_sync(module: FSDPModule):
    """FSDP2's no_sync: backward accumulates unsharded gradients; the next synced backward reduce-scatters the sum."""
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)


def trained_names(module: nn.Module) -> list[str]:
    """The names of the parameters the optimizer steps, in its order (torch.optim's index i is names[i])."""
    return [n for n, p in module.named_parameters() if p.requires_grad]


def by_name(state: dict) -> bool:
    return all(isinstance(i, str) for g in state["param_groups"] for i in g["params"])


def rekeyed(state: dict, key: dict) -> dict:
    """An optimizer state dict with each parameter key k replaced by key[k]."""
    try:
        return {"state": {key[k]: s for k, s in state["state"].items()},
                "param_groups": [{**g, "params": [key[k] for k in g["params"]]} for g in state["param_groups"]]}
    except KeyError as e:
        raise CheckpointError(f"the optimizer state has parameter {e.args[0]!r}, which the model lacks") from None


def optimizer_by_name(state: dict, module: nn.Module) -> dict:
    """An optimizer state dict keyed by parameter index (torch.optim's own) re-keyed by parameter name (FSDP's
    full form); one keyed by name already is returned as it is."""
    return state if by_name(state) else rekeyed(state, dict(enumerate(trained_names(module))))


def optimizer_by_index(state: dict, module: nn.Module) -> dict:
    """The reverse: keyed by name -> torch.optim's own (one process, or DDP, loading an FSDP checkpoint)."""
    return rekeyed(state, {n: i for i, n in enumerate(trained_names(module))}) if by_name(state) else state


class Parallel:
    """The plain module `model` and its training form under torchrun: DDP (kind='ddp') or FSDP2 over a copy
    (kind='fsdp'), then torch.compile when `compile` (train.compile)."""

    def __init__(self, model: nn.Module, world: World, device: torch.device, compile: bool = False,
                 kind: str = "ddp", param_dtype: torch.dtype | None = None, activation_checkpointing: bool = False):
        if kind not in PARALLEL:
            raise ValueError(f"unknown parallel kind '{kind}'; choose from {', '.join(PARALLEL)}")
        self.module = model
        self.ddp: nn.Module | None = None
        self.fsdp: FSDPModule | None = None
        if world.active and kind == "fsdp":
            # A copy is sharded (every rank built the same weights from the same seed); `model` stays whole.
            self.fsdp = shard(copy.deepcopy(model), param_dtype)
            self.pairs = list(zip(model.parameters(), self.fsdp.parameters()))
            self.buffer_pairs = list(zip(model.buffers(), self.fsdp.buffers()))
        elif world.active:
            # DDP broadcasts rank 0's weights when it is built and averages the gradients in backward; the EMAs,
            # grids and checkpoints read self.module (the same parameters).
            self.ddp = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None)
        trained = self.fsdp or self.ddp or model
        if activation_checkpointing:
            checkpoint_activations(self.fsdp or model)
        self.forward = torch.compile(trained) if compile else trained

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def parameters(self) -> list[nn.Parameter]:
        """The parameters the optimizer steps (FSDP: this rank's shards, as DTensors)."""
        return list((self.fsdp or self.module).parameters())

    def no_sync(self, skip: bool = True):
        """A context in which backward keeps this rank's gradients to itself when `skip`: every micro-batch but
        the last; the last one's backward reduces the sum. Nothing to skip in one process."""
        if not skip:
            return contextlib.nullcontext()
        if self.fsdp is not None:
            return no_gradient_sync(self.fsdp)
        return self.ddp.no_sync() if self.ddp is not None else contextlib.nullcontext()

    def clip_grad_norm(self, max_norm: float) -> Tensor:
        """Clip the gradients (already averaged over the ranks) to total L2 norm `max_norm` (inf: only measure);
        returns the norm before clipping, a plain 0-dim tensor on the device (read it in the step's one sync).
        Under FSDP clip_grad_norm_ sums the squares of every rank's shards: the norm is a replicated DTensor."""
        norm = torch.nn.utils.clip_grad_norm_(self.parameters(), max_norm)
        return norm.full_tensor() if isinstance(norm, DTensor) else norm

    @torch.no_grad()
    def after_step(self) -> None:
        """FSDP: gather the updated shards into the plain module (one all-gather per parameter), which the EMAs
        average next. Nothing to do otherwise: DDP and one process step the plain module itself."""
        if self.fsdp is None:
            return
        for plain, sharded in self.pairs:
            plain.copy_(sharded.full_tensor())
        for plain, buffer in self.buffer_pairs:
            plain.copy_(buffer)

    def full_state_dict(self) -> dict[str, Tensor]:
        """Every weight and buffer of the whole module, as its plain state dict (the checkpoint's "model")."""
        return self.module.state_dict()

    def load_full_state_dict(self, state: dict[str, Tensor], source: str) -> None:
        """Load a full state dict; a mismatch raises CheckpointError naming `source` and each mismatched key.
        FSDP: every rank holds the whole dict (each read the checkpoint) and keeps its shards of it."""
        load_model_state(self.module, state, source)
        if self.fsdp is not None:
            set_model_state_dict(self.fsdp, self.module.state_dict(), options=StateDictOptions(full_state_dict=True))

    def optimizer_state_dict(self, opt: torch.optim.Optimizer) -> dict:
        """The optimizer's state for a checkpoint. FSDP (a collective): the whole state gathered on rank 0 (the
        other ranks get an empty dict), keyed by parameter name; otherwise torch.optim's own, keyed by index."""
        if self.fsdp is None:
            return opt.state_dict()
        return get_optimizer_state_dict(self.fsdp, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_optimizer_state_dict(self, opt: torch.optim.Optimizer, state: dict) -> None:
        """Load an optimizer state written by either kind (keyed by index, or by name under FSDP), on any world
        size: FSDP keeps this rank's shard of each whole tensor."""
        if self.fsdp is None:
            opt.load_state_dict(optimizer_by_index(state, self.module))
        else:
            set_optimizer_state_dict(self.fsdp, opt, optimizer_by_name(state, self.module),
                                     options=StateDictOptions(full_state_dict=True))

    def unwrap(self) -> nn.Module:
        """The plain module: what EMAs average and what sampling, grids and exports call."""
        return self.module
