"""The project's only door to torch.distributed: process-group setup and collectives that are no-ops alone.

Every helper works the same with and without a launcher: in a single process (no process group) the gathers return
the input, reductions return it unchanged and barriers return at once, so callers never branch on `is_dist()`.

A leaf module (torch and the standard library only): models, datasets, tasks and the engine all import it, so a
model that gathers features across ranks does not load the training engine. `engine.dist` re-exports it and adds
what only the trainer needs (telling a failed peer from a failing task).
"""

from __future__ import annotations

import datetime
import os
from typing import Any

import torch
import torch.distributed as torch_dist


def is_dist() -> bool:
    """True when a process group is initialised (more than a plain single process)."""
    return torch_dist.is_available() and torch_dist.is_initialized()


def backend_name() -> str:
    """The process group's backend (nccl, gloo), or 'none' in a single process without one."""
    return str(torch_dist.get_backend()) if is_dist() else "none"


def get_rank() -> int:
    return torch_dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return torch_dist.get_world_size() if is_dist() else 1


def get_local_rank() -> int:
    """Rank within the node (LOCAL_RANK from torchrun, SLURM_LOCALID under srun, else 0)."""
    for name in ("LOCAL_RANK", "SLURM_LOCALID"):
        if name in os.environ:
            return int(os.environ[name])
    return 0


def is_main() -> bool:
    return get_rank() == 0


def check_cuda(what: str, index: int | None = None) -> None:
    """A ValueError saying why ``what`` (e.g. '--device cuda') cannot run here: no CUDA build of torch, no visible
    GPU, or no GPU number ``index``; instead of torch's driver error at the first tensor moved."""
    if torch.version.cuda is None:
        reason = f"this torch ({torch.__version__}) is built without CUDA"
    elif not torch.cuda.is_available():
        reason = (f"no CUDA GPU is visible on this machine (torch {torch.__version__}: no NVIDIA driver or device, or "
                  f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '(unset)')} hides them)")
    elif index is not None and index >= torch.cuda.device_count():
        reason = f"this machine has {torch.cuda.device_count()} CUDA GPU(s), numbered from 0"
    else:
        return
    raise ValueError(f"{what}: {reason}; use --device cpu")


def resolve_device(device_pref: str, local_rank: int = 0) -> torch.device:
    """'auto' | 'cpu' | 'cuda' -> a torch.device (cuda:<local_rank> on a GPU)."""
    if device_pref not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {device_pref!r}")
    if device_pref == "cuda":
        check_cuda("device cuda (--device or the config key device)")
    if device_pref == "cpu" or (device_pref == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def _launcher_env() -> tuple[int, int] | None:
    """(rank, world_size) from torchrun or SLURM variables; None when not launched as a group."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ and int(os.environ["SLURM_NTASKS"]) > 1:
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if name not in os.environ:
                ntasks = os.environ["SLURM_NTASKS"]
                raise ValueError(f"SLURM launch with {ntasks} tasks needs {name} in the environment")
        return int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"])
    return None


def init_distributed(device_pref: str = "auto", timeout_s: float = 1800) -> torch.device:
    """Join the process group described by the launcher environment (if any) and return this process's device.

    nccl on CUDA, gloo on CPU. A single process without launcher variables gets no process group.
    `timeout_s` (train.dist_timeout_s) bounds the rendezvous and every collective, so a rank that dies or hangs
    makes the others fail instead of waiting forever: gloo raises on the surviving ranks (at once when the peer's
    connection drops, after `timeout_s` when it hangs), which the trainer turns into an `engine.dist.PeerFailure`;
    NCCL's watchdog aborts the communicator and ends the process after `timeout_s` (TORCH_NCCL_ASYNC_ERROR_HANDLING=3).
    """
    launched = _launcher_env()
    local_rank = get_local_rank()
    device = resolve_device(device_pref, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if launched is None or is_dist():
        return device
    rank, world_size = launched
    if world_size <= 1:
        return device
    # torch's default since 2.2, made explicit (a user's own setting wins): on a collective timeout or a NCCL error
    # the watchdog tears the process down, so the launcher sees a failure instead of a rank blocked forever.
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3")
    timeout = datetime.timedelta(seconds=timeout_s)
    torch_dist.init_process_group(
        backend="nccl" if device.type == "cuda" else "gloo",
        store=_restart_store(world_size, timeout),
        init_method=None if _uses_agent_store() else "env://",
        rank=rank,
        world_size=world_size,
        timeout=timeout,
        device_id=device if device.type == "cuda" else None,
    )
    return device


def _uses_agent_store() -> bool:
    return os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"


def _restart_store(world_size: int, timeout: datetime.timedelta) -> torch_dist.Store | None:
    """Under torchrun's static rendezvous (--master_addr/--master_port, as run.sh launches), a store with a key prefix
    per restart attempt; None elsewhere (plain env:// rendezvous).

    That rendezvous keeps one TCPStore, hosted by the agent, across `--max-restarts` restarts, so without a prefix the
    restarted ranks read the dead ranks' connection keys and the restart fails ("Connection refused") instead of
    resuming with --resume auto.
    """
    if not _uses_agent_store():
        return None
    store = torch_dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                                is_master=False, timeout=timeout)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return torch_dist.PrefixStore(f"alignfuse_attempt{attempt}/", store)


def destroy() -> None:
    if is_dist():
        torch_dist.destroy_process_group()


def barrier() -> None:
    if is_dist():
        torch_dist.barrier()


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (picklable objects; for metrics and small results)."""
    if not is_dist():
        return [obj]
    out: list[Any] = [None] * get_world_size()
    torch_dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank."""
    if not is_dist():
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, src=src)
    return box[0]


@torch.no_grad()
def all_gather_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's `tensor` along dim 0 (no grad). Ranks may hold different lengths along dim 0."""
    if not is_dist():
        return tensor.detach()
    world = get_world_size()
    tensor = tensor.detach().contiguous()
    # Lengths first, so ranks with fewer rows (the tail of an eval split) pad to the longest and are trimmed back.
    length = torch.tensor([tensor.shape[0]], device=tensor.device, dtype=torch.long)
    lengths = [torch.zeros_like(length) for _ in range(world)]
    torch_dist.all_gather(lengths, length)
    sizes = [int(n.item()) for n in lengths]
    longest = max(sizes)
    if tensor.shape[0] < longest:
        pad = tensor.new_zeros((longest - tensor.shape[0], *tensor.shape[1:]))
        tensor = torch.cat([tensor, pad])
    parts = [torch.empty_like(tensor) for _ in range(world)]
    torch_dist.all_gather(parts, tensor)
    return torch.cat([part[:n] for part, n in zip(parts, sizes, strict=True)])


@torch.no_grad()
def all_gather_equal(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's `tensor` along dim 0 (no grad) when every rank holds the same shape, as in a training
    step: one collective and no host sync (`all_gather_tensor` first exchanges the lengths and reads them on the
    host, which would also split a compiled step's graph there)."""
    if not is_dist():
        return tensor.detach()
    parts = [torch.empty_like(tensor) for _ in range(get_world_size())]
    torch_dist.all_gather(parts, tensor.detach().contiguous())
    return torch.cat(parts)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward returns this rank's slice of the summed (over ranks) incoming gradients.

    Each rank's loss depends on every rank's features, so the gradient of the rank-averaged loss (what DDP
    averages) with respect to the local features sums the contributions of all ranks' losses.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.rows = get_rank(), tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(get_world_size())]
        torch_dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        torch_dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's `tensor` (equal shapes) along dim 0, keeping autograd through the local slice."""
    if not is_dist():
        return tensor
    return _GatherWithGrad.apply(tensor)


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean over ranks (a new tensor; the input is left as is)."""
    if not is_dist():
        return tensor
    out = tensor.detach().clone()
    torch_dist.all_reduce(out)
    return out / get_world_size()


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """Element-wise max over ranks (a new tensor)."""
    if not is_dist():
        return tensor
    out = tensor.detach().clone()
    torch_dist.all_reduce(out, op=torch_dist.ReduceOp.MAX)
    return out
