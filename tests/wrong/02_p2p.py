"""Plausible wrong answers to lesson 02's exercises: each check must catch them."""

import torch
import torch.distributed as dist


def send_tensor(tensor, dst, group=None):
    # Wrong: trusts its input. No REFUSED header for what it cannot describe (DTYPES.index
    # raises, the receiver is left waiting), and a tensor that is not contiguous is sent as is.
    header = torch.zeros(len(HEADER), dtype=torch.int64)
    header[:3] = torch.tensor([TENSOR, DTYPES.index(tensor.dtype), tensor.dim()])
    header[3 : 3 + tensor.dim()] = torch.tensor(tensor.shape, dtype=torch.int64)
    dist.send(header.to(tensor.device), dst, group)
    dist.send(tensor, dst, group)


def recv_tensor(src, device, group=None):
    # Wrong: trusts the header. Never looks at the kind, so it waits for a payload that the
    # sender of a REFUSED header, or of something that is not a header, never sends.
    header = torch.empty(len(HEADER), dtype=torch.int64, device=device)
    dist.recv(header, src, group)
    _, code, ndim, *sizes = header.tolist()
    tensor = torch.empty(sizes[:ndim], dtype=DTYPES[code], device=device)
    dist.recv(tensor, src, group)
    return tensor


def ring_all_reduce(x):
    # Wrong: stops after the reduce-scatter. Each rank holds one finished chunk; the others
    # are partial sums, because the all-gather that passes the finished chunks round is missing.
    rank, world_size = dist.get_rank(), dist.get_world_size()
    right, left = (rank + 1) % world_size, (rank - 1) % world_size
    out = x.clone(memory_format=torch.contiguous_format)
    chunks = out.view(-1).tensor_split(world_size)
    for s in range(world_size - 1):
        mine = chunks[(rank - s - 1) % world_size]
        incoming = torch.empty_like(mine)
        send = chunks[(rank - s) % world_size]
        works = dist.batch_isend_irecv(
            [dist.P2POp(dist.isend, send, right), dist.P2POp(dist.irecv, incoming, left)]
        )
        for work in works:
            work.wait()
        mine += incoming
    return out
