"""Broken on purpose: all_reduce of a (3,) tensor on rank 1 and of (4,) tensors on the others.

What is wrong
    all_reduce adds the tensors of all ranks element by element, so they must have the same
    shape. Rank 1 dropped a row of its batch and its gradient came out one element short.
    gloo does not check: it adds whatever bytes arrive.

Run it
    torchrun --nproc-per-node 4 lessons/broken/shape_mismatch.py --debug
    torchrun --nproc-per-node 4 lessons/broken/shape_mismatch.py --timeout 5

What you should see
    With --debug every rank fails at once: "Detected mismatch between collectives on ranks.
    Rank 0 is running collective: CollectiveFingerPrint(... TensorShape=[4] ...), but Rank 1
    is running collective: CollectiveFingerPrint(... TensorShape=[3] ...)... Tensor shapes:
    4vs 3". Without --debug nothing complains at first: rank 1 gets back a wrong sum (the check
    below catches it: "rank 1: all_reduce gave [...], the single-process sum is [...]"), and
    the other ranks fail once rank 1 is gone ("Connection closed by peer") or at the timeout.

The fix
    Make every rank contribute the same shape: pad the short tensor, or agree on the size first
    (all_reduce the sizes with MAX), as lesson 02's shape handshake does for send and recv.
"""

import torch
import torch.distributed as dist

from course.ranks import parser, print0, setup

SIZE = 4  # elements in every rank's gradient, but one short on rank 1


# --8<-- [start:main]
def main():
    args = parser(__doc__).parse_args()
    with setup(args, relaunch=True, trace=args.trace) as ctx:
        size = SIZE - 1 if ctx.rank == 1 else SIZE  # the mistake
        grad = torch.full((size,), float(ctx.rank + 1), device=ctx.device)
        dist.all_reduce(grad)
        expected = torch.full((size,), ctx.world_size * (ctx.world_size + 1) / 2)  # 1+2+...+N
        assert torch.equal(grad.cpu(), expected), (
            f"rank {ctx.rank}: all_reduce gave {grad.tolist()}, the single-process sum is "
            f"{expected.tolist()}"
        )
        print0(f"checked: all_reduce of rank+1 gives {expected.tolist()} on every rank")
    # --8<-- [end:main]


if __name__ == "__main__":
    main()
