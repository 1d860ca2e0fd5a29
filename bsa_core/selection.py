"""The one data structure between selection and attention (FlexAttention BlockMask style).

Per (batch, head, query cube): which queries of the cube are computed (q_count, q_index), which
kept query every slot copies its output from (q_source), and which KV cubes the kept queries attend
(kv_count, kv_index, ascending). Index lists are padded with -1 past their count; their width is any
bound >= the largest count (the GPU selection uses N to avoid a host sync): compare lists, not widths.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

_DENSE_CHUNK = 1 << 22  # index entries converted to int64 at once in to_dense


def mask_to_index(mask: torch.Tensor, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., M] bool -> (count [...] int32, index [..., width] int32 ascending, -1 padded)."""
    count = mask.sum(-1)
    if width is None:
        width = max(int(count.max()), 1) if mask.numel() else 1
    order = torch.argsort((~mask).to(torch.int8), dim=-1, stable=True)[..., :width]
    position = torch.arange(order.shape[-1], device=mask.device)
    index = torch.where(position < count[..., None], order, torch.full_like(order, -1))
    return count.to(torch.int32), index.to(torch.int32)


@dataclass
class BSASelection:
    """q_count [B,H,N], q_index [B,H,N,Kq] (slots), q_source [B,H,N,S] (positions in q_index,
    -1 on padding slots), kv_count [B,H,N], kv_index [B,H,N,Kkv] (KV cube ids); all int32."""

    q_count: torch.Tensor
    q_index: torch.Tensor
    q_source: torch.Tensor
    kv_count: torch.Tensor
    kv_index: torch.Tensor

    @property
    def num_cubes(self) -> int:
        return self.kv_count.shape[-1]

    def to_dense(self) -> torch.Tensor:
        """[B, H, N, N] bool: query cube n attends KV cube m. Built a few heads at a time: the int64 copy
        of the index that scatter needs stays under _DENSE_CHUNK elements."""
        N = self.num_cubes
        index = self.kv_index.reshape(-1, *self.kv_index.shape[-2:])
        dense = torch.zeros(index.shape[0], N, N + 1, dtype=torch.bool, device=index.device)
        step = max(1, _DENSE_CHUNK // max(1, index[0].numel()))
        for h in range(0, index.shape[0], step):
            part = index[h:h + step].long()
            dense[h:h + step].scatter_(-1, part.where(part >= 0, N), True)
        return dense.view(*self.kv_count.shape, N + 1)[..., :N]

    def kept_query_mask(self) -> torch.Tensor:
        """[B, H, N, S] bool: the slot's query is computed, not copied."""
        S = self.q_source.shape[-1]
        dense = torch.zeros(*self.q_count.shape, S + 1, dtype=torch.bool, device=self.q_count.device)
        dense.scatter_(-1, self.q_index.long().where(self.q_index >= 0, S), True)
        return dense[..., :S]

    def transposed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(count [B,H,N], index [B,H,N,K]): per KV cube, the query cubes that use it (for backward)."""
        return mask_to_index(self.to_dense().transpose(-1, -2))

    def kept_query_fraction(self, n_valid: torch.Tensor) -> torch.Tensor:
        """Computed queries / real queries over all batches and heads (0-d tensor: no device sync)."""
        return self.q_count.double().sum() / (n_valid.double().sum() * self.q_count[..., 0].numel())

    def kept_kv_fraction(self) -> torch.Tensor:
        """Mean share of KV cubes a query cube attends (0-d tensor: no device sync)."""
        return self.kv_count.double().mean() / self.num_cubes

    def __repr__(self) -> str:
        B, H, N = self.kv_count.shape
        return (f"BSASelection(batch={B}, heads={H}, cubes={N}, query_slots={self.q_source.shape[-1]}, "
                f"kept_queries={self.q_count.double().mean():.1f}/cube, "
                f"kept_kv={100 * float(self.kept_kv_fraction()):.1f}%)")

    def to_string(self, batch: int = 0, head: int = 0) -> str:
        """The KV mask of one head as text: '#' attended, '.' skipped."""
        rows = self.to_dense()[batch, head].tolist()
        return "\n".join("".join("#" if x else "." for x in row) for row in rows)
