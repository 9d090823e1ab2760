"""The engine's door to torch.distributed: every helper of `common.dist` (the leaf module that models and datasets
use too), plus how the trainer tells a failed peer from a failing task (`PeerFailure`, `is_peer_failure`)."""

from __future__ import annotations

from pathlib import Path

import torch.distributed as torch_dist

from common.dist import (
    all_gather_equal,
    all_gather_object,
    all_gather_tensor,
    all_gather_with_grad,
    all_reduce_max,
    all_reduce_mean,
    backend_name,
    barrier,
    broadcast_object,
    check_cuda,
    destroy,
    get_local_rank,
    get_rank,
    get_world_size,
    init_distributed,
    is_dist,
    is_main,
    resolve_device,
)

__all__ = [
    "PeerFailure",
    "peer_failure",
    "all_gather_equal",
    "all_gather_object",
    "all_gather_tensor",
    "all_gather_with_grad",
    "all_reduce_max",
    "all_reduce_mean",
    "backend_name",
    "barrier",
    "broadcast_object",
    "check_cuda",
    "destroy",
    "get_local_rank",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "is_dist",
    "is_main",
    "is_peer_failure",
    "resolve_device",
]


class PeerFailure(RuntimeError):
    """A collective failed on this rank because another rank died, hung past the timeout or lost its connection."""


# Words in the RuntimeErrors the gloo / NCCL backends raise when a peer is gone or a collective timed out (gloo's
# messages carry their source path, e.g. "gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 4000ms").
_PEER_FAILURE_MARKERS = ("gloo", "nccl", "connection reset", "connection closed", "broken pipe")


def is_peer_failure(err: BaseException) -> bool:
    """Whether `err`, raised in a process group, comes from the communication layer rather than from the task."""
    if not is_dist():
        return False
    if isinstance(err, torch_dist.DistError):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and any(marker in text for marker in _PEER_FAILURE_MARKERS)


def peer_failure(err: BaseException, where: str, timeout_s: float, output_dir: Path) -> PeerFailure:
    """The error a surviving rank exits with when a collective failed at `where` (a rank died, hung or was cut off)."""
    cause = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return PeerFailure(
        f"rank {get_rank()} of {get_world_size()}: a collective operation failed at {where}: another rank has most "
        f"likely died, hung or lost its connection (collectives wait at most train.dist_timeout_s={timeout_s:g} s). "
        f"The other ranks' logs hold the root cause; resumable checkpoints are in {output_dir}: restart the job with "
        f"--resume auto. Cause: {cause}"
    )
