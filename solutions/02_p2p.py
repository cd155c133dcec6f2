"""Reference solutions for lessons/02_p2p.py. Check them: python -m lessons.check 02 --solution

Each function runs in the lesson's namespace: torch, dist and the lesson's helpers (HEADER,
TENSOR, REFUSED, DTYPES, MAX_NDIM) are in scope. These two functions are the reference version
of the shape handshake that later lessons write inline.
"""

import torch
import torch.distributed as dist


# --8<-- [start:ex-02-1]
def send_tensor(tensor: torch.Tensor, dst: int, group=None) -> None:
    """Exercise 02.1: send `tensor` to rank `dst` as a header (HEADER's layout), then the payload.

    Any dtype in DTYPES, 0 to MAX_NDIM dimensions, contiguous or not. Anything else: send a
    REFUSED header (so that the receiver fails now, not at its timeout), then raise ValueError.
    """
    # YOUR CODE BELOW
    if tensor.dtype not in DTYPES:
        problem = f"dtype {tensor.dtype}: the header can name only {DTYPES}"
    elif tensor.dim() > MAX_NDIM:
        problem = f"{tensor.dim()} dimensions: the header has room for MAX_NDIM = {MAX_NDIM}"
    else:
        sizes = [*tensor.shape, *[0] * (MAX_NDIM - tensor.dim())]  # always MAX_NDIM sizes
        header = torch.tensor([TENSOR, DTYPES.index(tensor.dtype), tensor.dim(), *sizes])
        dist.send(header.to(tensor.device), dst, group)
        # Same pair, same group: the payload arrives after its header. Contiguous: both
        # backends send a tensor's memory as it lies.
        dist.send(tensor.contiguous(), dst, group)
        return
    refusal = torch.zeros(len(HEADER), dtype=torch.int64)
    refusal[0] = REFUSED  # the receiver raises too, instead of waiting for a payload
    dist.send(refusal.to(tensor.device), dst, group)
    raise ValueError(
        f"send_tensor to rank {dst}: cannot send a tensor of {problem}. Convert or "
        "reshape it first (the receiver was told: REFUSED)."
    )


def recv_tensor(src: int, device: torch.device, group=None) -> torch.Tensor:
    """Exercise 02.1: receive, on `device`, one tensor that send_tensor sent from rank `src`.

    Raise ValueError, saying what was wrong, for a REFUSED header or one that is not a header
    (a kind other than TENSOR, a dtype code outside DTYPES, ndim outside 0..MAX_NDIM, a
    negative size), and receive no payload then.
    """
    # YOUR CODE BELOW
    header = torch.empty(len(HEADER), dtype=torch.int64, device=device)
    dist.recv(header, src, group)
    kind, code, ndim, *sizes = header.tolist()
    if kind == REFUSED:
        raise ValueError(
            f"recv_tensor from rank {src}: the sender refused its tensor (REFUSED "
            "header); its own error says why"
        )
    if kind != TENSOR:
        problem = f"kind {kind} is neither TENSOR ({TENSOR}) nor REFUSED ({REFUSED})"
    elif not 0 <= code < len(DTYPES):
        problem = f"dtype code {code} is not in 0..{len(DTYPES) - 1}"
    elif not 0 <= ndim <= MAX_NDIM:
        problem = f"ndim {ndim} is not in 0..{MAX_NDIM}"
    elif min(sizes[:ndim], default=0) < 0:
        problem = f"a negative size in {sizes[:ndim]}"
    else:  # a sound header: now the payload can be allocated and received
        tensor = torch.empty(sizes[:ndim], dtype=DTYPES[code], device=device)
        dist.recv(tensor, src, group)
        return tensor
    raise ValueError(
        f"recv_tensor from rank {src}: not a header ({problem}): sender and "
        f"receiver are out of step. The header was {header.tolist()}"
    )
    # --8<-- [end:ex-02-1]


# --8<-- [start:ex-02-2]
def ring_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Exercise 02.2: the sum of `x` over all ranks, on every rank, from isend/irecv in a ring.

    Cut a flat copy of x into world_size chunks. Reduce-scatter: world_size-1 steps, each
    sending one chunk right and adding the one from the left into yours. All-gather:
    world_size-1 more steps passing the finished chunks round. Post each step's isend and
    irecv as one batch_isend_irecv (on NCCL, all ranks sending first could deadlock).
    Leave `x` as it was.
    """
    # YOUR CODE BELOW
    rank, world_size = dist.get_rank(), dist.get_world_size()
    right, left = (rank + 1) % world_size, (rank - 1) % world_size
    out = x.clone(memory_format=torch.contiguous_format)  # a copy: x stays as it was
    chunks = out.view(-1).tensor_split(world_size)  # views: writing a chunk writes `out`

    def step(send_index, recv_into):  # one ring step: send a chunk right, receive from the left
        works = dist.batch_isend_irecv(
            [
                dist.P2POp(dist.isend, chunks[send_index], right),
                dist.P2POp(dist.irecv, recv_into, left),
            ]
        )
        for work in works:
            work.wait()

    # Reduce-scatter: at step s, rank r passes on chunk r-s and adds chunk r-s-1 from the left.
    # After world_size-1 steps, chunk r+1 holds the sum of every rank's.
    for s in range(world_size - 1):
        mine = chunks[(rank - s - 1) % world_size]
        incoming = torch.empty_like(mine)
        step((rank - s) % world_size, incoming)
        mine += incoming
    # All-gather: at step s, rank r passes on its finished chunk r+1-s, receives chunk r-s.
    for s in range(world_size - 1):
        step((rank + 1 - s) % world_size, chunks[(rank - s) % world_size])
    return out
    # --8<-- [end:ex-02-2]
