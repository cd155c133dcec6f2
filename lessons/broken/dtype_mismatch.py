"""Broken on purpose: an all_reduce whose tensor is float64 on one rank and float32 elsewhere.

What is wrong
    Rank 3 builds its gradient in float64 (a `torch.tensor` of Python floats with a dtype
    forgotten elsewhere); the others in float32. Under gloo the ranks exchange raw bytes: a rank
    that receives rank 3's 8-byte elements gets twice the bytes its buffer holds, and gloo
    aborts that rank (SIGABRT) with "Received data size doesn't match expected size". The rank
    that dies is the receiver (rank 2 here), not rank 3: a summary that names the first rank to
    die blames the wrong one.

Run it
    torchrun --nproc-per-node 4 lessons/broken/dtype_mismatch.py --debug
    torchrun --nproc-per-node 4 lessons/broken/dtype_mismatch.py

What you should see
    With --debug, every rank fails at once: "Detected mismatch between collectives on ranks.
    Rank 0 is running collective: ...TensorDtypes=Float..., but Rank 3 is running collective:
    ...TensorDtypes=Double": rank 3 named. Without it, the rank that aborts shows gloo's message
    and its Python line (faulthandler: "Fatal Python error: Aborted, in all_reduce() called at
    lessons/broken/dtype_mismatch.py:NN"), and the launcher's line says that the rank whose
    tensor differs may be another one, and that --debug names it.

The fix
    One dtype everywhere: create tensors with an explicit dtype, or `.float()` before the call.
"""

import torch
import torch.distributed as dist

from course.ranks import parser, print_rank, setup

NEEDS = ("exactly 4 ranks", lambda n: n == 4)


# --8<-- [start:main]
def main():
    args = parser(__doc__).parse_args()
    with setup(args, NEEDS, relaunch=True, trace=args.trace) as ctx:
        grad = torch.ones(1000, device=ctx.device)
        if ctx.rank == 3:
            grad = grad.double()  # the mistake: this rank's gradient is float64
        dist.all_reduce(grad)
        print_rank(f"sum: {grad[0].item()}")
    # --8<-- [end:main]


if __name__ == "__main__":
    main()
