"""Broken on purpose: the last rank runs out of batches and skips the last all_reduce.

What is wrong
    Each rank trains on its own shard of the data and averages gradients with all_reduce after
    every batch. The shards are not the same length: the last rank has one batch fewer. After
    its last batch it moves on to evaluation, while the others wait in an all_reduce it will
    never join. Uneven data is the most common way a rank skips a collective.

Run it
    torchrun --nproc-per-node 4 lessons/broken/skipped_collective.py --debug
    torchrun --nproc-per-node 4 lessons/broken/skipped_collective.py --timeout 5

What you should see
    With --debug, after the 10 s timeout: rank 0 says "[Rank 0]: Ranks 3 failed to pass
    monitoredBarrier in 10000 ms" - the stuck rank, by number - with the all_reduce line of
    this file in its traceback. Without --debug the waiting ranks say only "Timed out waiting
    5000ms for recv operation to complete", which names neither rank 3 nor the call.

The fix
    Give every rank the same number of steps: drop the remainder of the data (what
    DistributedSampler(drop_last=True) does) or pad the short shards; or agree on the number of
    steps first (all_reduce the batch counts with MIN).
"""

import time

import torch
import torch.distributed as dist

from course.ranks import parser, print_rank, setup
from lessons.broken import explain

BATCHES = 3  # batches per rank, and one fewer on the last rank
EVALUATION_S = 30  # the last rank evaluates this long: far past the others' timeout


# --8<-- [start:main]
def main():
    args = parser(__doc__).parse_args()
    with setup(args, relaunch=True, trace=args.trace) as ctx:
        last = ctx.world_size - 1
        batches = BATCHES - 1 if ctx.rank == last else BATCHES  # the mistake: uneven shards
        for _ in range(batches):
            grad = torch.full((4,), float(ctx.rank), device=ctx.device)
            with explain(
                f"rank {last} had {BATCHES - 1} batches, the others {BATCHES}: it "
                f"skipped the all_reduce of step {BATCHES - 1} and never came back"
            ):
                dist.all_reduce(grad)
        print_rank(f"trained on {batches} batches; evaluating")
        time.sleep(EVALUATION_S)  # stands for an evaluation with no collective in it
        dist.barrier()
    # --8<-- [end:main]


if __name__ == "__main__":
    main()
