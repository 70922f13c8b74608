"""Tensor- and pipeline-parallel process groups; at size 1 every collective is a no-op."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class GroupCoordinator:
    ranks: list[int]       # global ranks in this group
    rank: int              # this process's global rank
    group: object = None   # torch.distributed ProcessGroup (None at size 1)

    @property
    def world_size(self) -> int:
        return len(self.ranks)

    @property
    def rank_in_group(self) -> int:
        return self.ranks.index(self.rank)

    @property
    def is_first_rank(self) -> bool:
        return self.rank_in_group == 0

    @property
    def is_last_rank(self) -> bool:
        return self.rank_in_group == self.world_size - 1

    @property
    def next_rank(self) -> int:
        return self.ranks[(self.rank_in_group + 1) % self.world_size]

    @property
    def prev_rank(self) -> int:
        return self.ranks[(self.rank_in_group - 1) % self.world_size]

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        if self.world_size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=dim)

    def send(self, x: torch.Tensor, dst: int) -> None:
        dist.send(x.contiguous(), dst=dst, group=self.group)

    def recv(self, shape: tuple[int, ...], dtype: torch.dtype, src: int, device: torch.device) -> torch.Tensor:
        x = torch.empty(shape, dtype=dtype, device=device)
        dist.recv(x, src=src, group=self.group)
        return x


_TP: GroupCoordinator | None = None
_PP: GroupCoordinator | None = None


def init_model_parallel(tp_size: int = 1, pp_size: int = 1, rank: int = 0) -> None:
    """Build the groups. Global rank = pp_rank * tp_size + tp_rank (TP ranks are neighbours)."""
    global _TP, _PP
    world = tp_size * pp_size
    tp_groups = [list(range(p * tp_size, (p + 1) * tp_size)) for p in range(pp_size)]
    pp_groups = [list(range(t, world, tp_size)) for t in range(tp_size)]
    for ranks_list, kind in ((tp_groups, "tp"), (pp_groups, "pp")):
        for ranks in ranks_list:
            # Every rank must take part in creating every group, even the ones it is not in.
            group = dist.new_group(ranks) if world > 1 else None
            if rank in ranks:
                coordinator = GroupCoordinator(ranks, rank, group)
                if kind == "tp":
                    _TP = coordinator
                else:
                    _PP = coordinator


def get_tp_group() -> GroupCoordinator:
    if _TP is None:
        init_model_parallel()
    return _TP


def get_pp_group() -> GroupCoordinator:
    if _PP is None:
        init_model_parallel()
    return _PP
