"""Answers to lesson 02's exercises that get the right numbers but skip what the exercise
teaches: each check must catch them and say why (tests/test_checks_catch.py)."""

import torch
import torch.distributed as dist

MINE, NOT_MINE = 1, 2  # skips the point: a private header, not HEADER's (kind TENSOR, REFUSED)


def send_tensor(tensor, dst, group=None):
    # Works with its own recv_tensor only: lesson 06 and distill_demo speak HEADER's protocol.
    header = torch.zeros(len(HEADER), dtype=torch.int64)
    if tensor.dtype not in DTYPES or tensor.dim() > MAX_NDIM:
        header[0] = NOT_MINE
        dist.send(header.to(tensor.device), dst, group)
        raise ValueError(f"cannot send a {tensor.dim()}-D {tensor.dtype} tensor")
    header[:3] = torch.tensor([MINE, DTYPES.index(tensor.dtype), tensor.dim()])
    header[3 : 3 + tensor.dim()] = torch.tensor(tensor.shape, dtype=torch.int64)
    dist.send(header.to(tensor.device), dst, group)
    dist.send(tensor.contiguous(), dst, group)


def recv_tensor(src, device, group=None):
    header = torch.empty(len(HEADER), dtype=torch.int64, device=device)
    dist.recv(header, src, group)
    kind, code, ndim, *sizes = header.tolist()
    if kind != MINE or not 0 <= code < len(DTYPES) or not 0 <= ndim <= MAX_NDIM:
        raise ValueError(f"recv_tensor from rank {src}: refused, or not a header: {kind}")
    tensor = torch.empty(sizes[:ndim], dtype=DTYPES[code], device=device)
    dist.recv(tensor, src, group)
    return tensor


def ring_all_reduce(x):
    # Skips the point: the ring of isend/irecv is the exercise, not the sum.
    y = x.clone()
    dist.all_reduce(y)
    return y
