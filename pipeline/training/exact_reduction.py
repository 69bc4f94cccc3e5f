"""Gradients summed in one fixed order at any world size (train.exact_reduction).

DDP's all-reduce adds the ranks' gradients in an order of its own (a ring over the ranks, a
different starting rank for each piece of the buffer), after each rank has added its own
micro-batches: 1 process x 4 accumulation steps, 2 x 2 and 4 x 1 add the same four gradients in
three different orders. Float addition does not associate, so their weights part in the last bits
within a few steps (only 1 x 2 against 2 x 1 happen to agree: a + b is b + a). Here each
micro-batch's gradient is kept apart, every rank gathers all of them, and every rank adds them in
the global batch's chunk order (order.chunk_index): the same sum, bit for bit, at any world size.
The price: W times an all-reduce's traffic and A gradient copies per rank. Worth it for small
models and for audits of elastic runs; off by default.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from pipeline.data.order import BatchLayout


@dataclass(frozen=True)
class ExactReduction:
    layout: BatchLayout

    def take(self, params: list[torch.nn.Parameter]) -> torch.Tensor:
        """This micro-batch's gradient as one flat vector; the parameters' gradients cleared for the next."""
        flat = torch.cat([p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), device=p.device,
                                                                                      dtype=p.dtype)
                          for p in params])
        for p in params:
            p.grad = None
        return flat

    def apply(self, params: list[torch.nn.Parameter], mine: list[torch.Tensor]) -> None:
        """Set every parameter's gradient to the mean over the global batch's micro-batches, added in chunk order."""
        local = torch.stack(mine)  # [A, P]: this rank's chunks a*W + rank, a = 0..A-1
        world = self.layout.world_size
        if world > 1:
            gathered = [torch.empty_like(local) for _ in range(world)]
            dist.all_gather(gathered, local.contiguous())
            local = torch.stack(gathered)  # [W, A, P]
        else:
            local = local[None]
        chunks = local.transpose(0, 1).reshape(-1, local.shape[-1])  # chunk a*W + r at row a*W + r
        total = chunks[0].clone()
        for row in chunks[1:]:  # a left fold: one order of additions, whatever W and A are
            total += row
        total /= len(chunks)
        at = 0
        for p in params:
            p.grad = total[at:at + p.numel()].view_as(p).clone()
            at += p.numel()
