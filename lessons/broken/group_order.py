"""Broken on purpose: two groups created in a different order on different ranks.

What is wrong
    Every rank calls new_group for both groups, as it must - but ranks 0 and 1 create [0, 1]
    first while ranks 2 and 3 create [2, 3] first. A group's name comes from a counter on each
    rank, so group "1" is [0, 1] on ranks 0-1 and [2, 3] on ranks 2-3, and their collectives
    can meet the wrong partners. torch does not notice: the all_reduce over each pair gave 5.0
    on all four ranks where 3.0 and 7.0 were right (no error at all), or new_group itself hung,
    from one run to the next.

Run it
    torchrun --nproc-per-node 4 lessons/broken/group_order.py

What you should see
    Every rank fails at once, in its first new_group call, before any group exists:
    "the ranks disagree on new_group call 1: [0, 1] on ranks 0, 1 (at
    lessons/broken/group_order.py:NN) but [2, 3] on ranks 2, 3 (at ...)", and the rule. The
    course compares each rank's k-th new_group call with the others' (course/watch.py), on
    every run: torch itself has no such check.

The fix
    Create the groups from one list, built the same way on every rank:
    `pairs = [dist.new_group(ranks) for ranks in ([0, 1], [2, 3])]`. Lesson 01 shows the rule.
"""

import torch
import torch.distributed as dist

from course.ranks import parser, print_rank, setup

NEEDS = ("exactly 4 ranks", lambda n: n == 4)


# --8<-- [start:main]
def main():
    args = parser(__doc__).parse_args()
    with setup(args, NEEDS, relaunch=True, trace=args.trace) as ctx:
        mine = [0, 1] if ctx.rank < 2 else [2, 3]
        other = [2, 3] if ctx.rank < 2 else [0, 1]
        groups = {}
        for ranks in (mine, other):  # the mistake: each rank creates its own pair first
            groups[tuple(ranks)] = dist.new_group(ranks)
        x = torch.full((2,), float(ctx.rank + 1), device=ctx.device)
        dist.all_reduce(x, group=groups[tuple(mine)])
        print_rank(f"sum over my pair: {x.tolist()}")
    # --8<-- [end:main]


if __name__ == "__main__":
    main()
