"""A toy Task for the engine tests: a tiny MLP (no batch-norm, no dropout) regressing random tensors.

Run as a script it is an entry point like Pretrain.py: `python tests/toy_task.py --output_dir OUT --opts ...`.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, when run as a script

import engine  # noqa: E402
from dataset.sampler import ResumableDistributedSampler  # noqa: E402
from engine import Progress, Task  # noqa: E402


class ToyDataset(Dataset):
    """(x, y) pairs with y a fixed linear map of x plus noise; items accept an int or an (index, epoch) tuple."""

    def __init__(self, num_samples: int, seed: int, dim_in: int = 4, dim_out: int = 2) -> None:
        weight = torch.randn(dim_in, dim_out, generator=torch.Generator().manual_seed(0))  # the same map for all splits
        generator = torch.Generator().manual_seed(seed)
        self.x = torch.randn(num_samples, dim_in, generator=generator)  # (N, dim_in)
        self.y = self.x @ weight + 0.1 * torch.randn(num_samples, dim_out, generator=generator)  # (N, dim_out)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        index = item[0] if isinstance(item, tuple) else item
        return self.x[index], self.y[index]


class ToyTask(Task):
    name = "toy"
    config_defaults = {
        "toy": {
            "num_samples": 32,  # training samples
            "batch_size": 4,  # per rank
            "hidden": 8,  # MLP width
            "shuffle": True,
            "noise_std": 0.0,  # input noise drawn from torch's global RNG in train_step (tests RNG resume)
            "nan_at_calls": [],  # 1-based train_step calls whose loss is NaN
            "sigterm_at_step": -1,  # send SIGTERM to this process when train_step sees this global step
            "constant_metric": False,  # evaluate() returns a constant (never improves) - for early stopping
            # Distributed fault injection: rank fail_rank fails when train_step sees global step fail_at_step, in the
            # first attempt of a job only (a torchrun restart, TORCHELASTIC_RESTART_COUNT > 0, runs clean).
            "fail_rank": -1,
            "fail_at_step": -1,
            "fail_mode": "exit",  # exit (the process dies: os._exit(1)) | hang (it stops answering collectives)
        }
    }
    best_metric = "loss"
    best_mode = "min"

    def __init__(self, config: engine.Config, device: torch.device) -> None:
        super().__init__(config, device)
        self.calls = 0
        self.signalled = False
        self.trajectory: dict[int, list[torch.Tensor]] = {}  # global step -> weights seen by train_step
        self.seen: list[tuple[int, list[torch.Tensor]]] = []  # (global step, weights) at every train_step call
        self.evaluations = 0
        self.epochs_ended: list[int] = []
        val = ToyDataset(16, seed=1234)
        self.val_x, self.val_y = val.x, val.y

    def build_model(self) -> nn.Module:
        hidden = self.config.toy.hidden
        self.model = nn.Sequential(nn.Linear(4, hidden), nn.Tanh(), nn.Linear(hidden, 2))
        return self.model

    def build_train_loader(self) -> DataLoader:
        cfg = self.config.toy
        dataset = ToyDataset(cfg.num_samples, seed=7)
        sampler = ResumableDistributedSampler(dataset, shuffle=cfg.shuffle, seed=self.config.seed, yield_epoch=True)
        return DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, num_workers=0)

    def train_step(self, model: nn.Module, batch: Any, progress: Progress) -> dict[str, torch.Tensor]:
        self.calls += 1
        cfg = self.config.toy
        self.trajectory[progress.global_step] = [p.detach().clone() for p in self.model.parameters()]
        self.seen.append((progress.global_step, self.trajectory[progress.global_step]))
        if progress.global_step == cfg.sigterm_at_step and not self.signalled:
            self.signalled = True
            os.kill(os.getpid(), signal.SIGTERM)
        first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
        if progress.global_step == cfg.fail_at_step and engine.dist.get_rank() == cfg.fail_rank and first_attempt:
            self.fail(cfg.fail_mode)
        x, y = (t.to(self.device) for t in batch)  # (B, 4), (B, 2)
        if cfg.noise_std > 0:
            x = x + cfg.noise_std * torch.randn_like(x)
        pred = model(x)  # (B, 2)
        mse = F.mse_loss(pred, y)
        if self.calls in cfg.nan_at_calls:
            mse = mse * float("nan")
        return {"mse": mse, "l1": (pred - y).abs().mean()}

    @staticmethod
    def fail(mode: str) -> None:
        """Simulate a lost rank: a crash that skips all cleanup, or a process stuck outside any collective."""
        print(f"toy: rank {engine.dist.get_rank()} fails ({mode})", file=sys.stderr, flush=True)
        if mode == "exit":
            os._exit(1)
        if mode != "hang":
            raise ValueError(f"toy.fail_mode must be exit or hang, got {mode!r}")
        while True:  # ignores SIGTERM too (the engine's handler only sets a flag), like a rank stuck in a kernel
            time.sleep(1)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str) -> dict[str, float]:
        self.evaluations += 1
        if self.config.toy.constant_metric:
            return {"loss": 1.0}
        pred = model(self.val_x.to(self.device))
        return {"loss": F.mse_loss(pred, self.val_y.to(self.device)).item()}

    def on_epoch_end(self, epoch: int) -> None:
        self.epochs_ended.append(epoch)


def collective_results(rank: int) -> dict[str, Any]:
    """What engine.dist's helpers return on this rank (inside a process group), for the test to compare."""
    from engine import dist

    base = torch.arange(6.0).reshape(2, 3)
    local = ((rank + 1) * base).requires_grad_(True)  # (2, 3)
    gathered = dist.all_gather_with_grad(local)  # (2 * world, 3)
    weight = torch.linspace(-1, 1, gathered.numel()).reshape(gathered.shape)  # the same on every rank
    (gathered.pow(2) * weight).sum().backward()
    return {
        "gather_tensor": dist.all_gather_tensor(torch.arange(rank + 1)),  # ranks hold different lengths
        "gather_object": dist.all_gather_object({"rank": rank}),
        "broadcast": dist.broadcast_object("from rank 0" if rank == 0 else None),
        "mean": dist.all_reduce_mean(torch.tensor(float(rank))),
        "gathered": gathered.detach(),
        "local_grad": local.grad,
        "weight": weight,
    }


def ddp_worker(rank: int, world_size: int, port: int, argv: list[str], out_dir: str) -> None:
    """torch.multiprocessing.spawn target: one rank of a gloo run; saves its final weights for the test."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    trainer = engine.build_trainer(ToyTask, argv)
    try:
        trainer.fit()
        torch.save({"model": trainer.model.state_dict(), "collectives": collective_results(rank),
                    "world_size": engine.dist.get_world_size()}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        trainer.close()


main = engine.main_for(ToyTask)

if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
