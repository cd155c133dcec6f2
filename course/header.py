"""Lesson 02's shape handshake as a protocol: its one copy, which lesson 02's exercise, lesson 06
and distill_demo use. Lesson 02 explains it; lesson 06 sends its tensors with the functions below.

Every message is a header, then, if the header says TENSOR, the payload. The header has the
same length whatever it describes, so that the receiver can allocate it before it knows
anything: len(HEADER) int64s, on the payload's device.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

# --8<-- [start:header]
HEADER = (
    "kind",
    "dtype code",
    "ndim",
    "size 0",
    "size 1",
    "size 2",
    "size 3",
    "size 4",
    "size 5",
    "size 6",
    "size 7",
)
MAX_NDIM = len(HEADER) - 3  # 8 sizes: tensors of 0 to 8 dimensions; unused sizes are 0
# Field 0, the kind of message: values that a payload read by mistake is unlikely to hold.
TENSOR = 20_202  # a payload of this dtype and shape follows
REFUSED = 20_203  # the sender could not describe its tensor (and raised): nothing follows
STOP = 20_204  # lesson 06: no payload follows, and none will: training is over
# Any other kind is not a header (e.g. a payload read where a header was expected): refuse it.
# The dtypes both gloo and NCCL carry (NCCL has no 16-bit integers); dtype code = position.
DTYPES = (
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int8,
    torch.uint8,
    torch.bool,
)
# --8<-- [end:header]


# --8<-- [start:protocol]
# Lesson 06's messages: lesson 02's handshake plus a kind it did not need, STOP. A message is a
# header the receiver can always allocate, len(HEADER) int64s (kind, dtype code, ndim, sizes),
# then, for a TENSOR, the payload, which it can allocate only once the header has told it the
# shape. A STOP header has no payload: training is over.
def send_tensor(tensor: torch.Tensor, dst: int, group: dist.ProcessGroup) -> list[dist.Work]:
    """Start sending `tensor` to `dst`; returns the two requests (wait() on them before reuse).
    A tensor the header cannot describe (a dtype outside DTYPES, more than MAX_NDIM dimensions):
    send REFUSED, so that the receiver fails at once too, then raise ValueError."""
    if tensor.dtype not in DTYPES or tensor.dim() > MAX_NDIM:
        refused = torch.tensor([REFUSED] + [0] * (len(HEADER) - 1), device=tensor.device)
        dist.send(refused, dst, group)
        raise ValueError(
            f"send_tensor to rank {dst}: a tensor of dtype {tensor.dtype} and {tensor.dim()} "
            f"dimensions does not fit the header (dtypes {DTYPES}, at most {MAX_NDIM} dimensions)"
        )
    sizes = [*tensor.shape] + [0] * (MAX_NDIM - tensor.dim())  # unused sizes are 0
    kind = [TENSOR, DTYPES.index(tensor.dtype), tensor.dim()]
    header = torch.tensor(kind + sizes, device=tensor.device)
    # isend returns at once; the same pair's messages arrive in the order they were sent.
    return [dist.isend(header, dst, group), dist.isend(tensor.contiguous(), dst, group)]


def send_stop(dst: int, group: dist.ProcessGroup, device: torch.device) -> None:
    dist.send(torch.tensor([STOP] + [0] * (len(HEADER) - 1), device=device), dst, group)


def recv_tensor(src: int, group: dist.ProcessGroup, device: torch.device) -> torch.Tensor | None:
    """The next tensor from `src`, or None if `src` sent STOP. ValueError if `src` refused its
    tensor, or sent something that is not a header."""
    header = torch.empty(len(HEADER), dtype=torch.int64, device=device)
    dist.recv(header, src, group)
    kind, dtype, ndim, *sizes = header.tolist()
    if kind == REFUSED:
        raise ValueError(f"recv_tensor from rank {src}: it refused its tensor (its error says why)")
    if kind == STOP:
        return None
    if kind != TENSOR or not 0 <= dtype < len(DTYPES) or not 0 <= ndim <= MAX_NDIM:
        raise ValueError(
            f"recv_tensor from rank {src}: not a header ({header.tolist()}): sender and "
            "receiver are out of step"
        )
    tensor = torch.empty(sizes[:ndim], dtype=DTYPES[dtype], device=device)
    dist.recv(tensor, src, group)
    return tensor


# --8<-- [end:protocol]
