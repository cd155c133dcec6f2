"""Broken on purpose: two groups created in a different order on different ranks.

What is wrong
    Every rank calls new_group for both groups, as it must - but ranks 0 and 1 create [0, 1]
    first while ranks 2 and 3 create [2, 3] first. A group's name comes from a counter on each
    rank, so group "1" is [0, 1] on ranks 0-1 and [2, 3] on ranks 2-3, and their collectives
    can meet the wrong partners. torch does not notice: the all_reduce over each pair gave 5.0
    on all four ranks where 3.0 and 7.0 were right (no error at all), or new_group itself hung,
    from one run to the next.

Run it
    torchrun --nproc-per-node 4 lessons/broken/group_order.py --debug

What you should see
    The ranks first compare the new_group calls they are about to make
    (lessons.broken.same_on_every_rank), and every rank fails before any group exists: "the
    ranks disagree on the new_group calls, in order: [[0, 1], [2, 3]] on ranks 0, 1 but
    [[2, 3], [0, 1]] on ranks 2, 3", with a line that says why.

The fix
    Create the groups from one list, built the same way on every rank:
    `pairs = [dist.new_group(ranks) for ranks in ([0, 1], [2, 3])]`. Lesson 01 shows the rule.
"""

import torch
import torch.distributed as dist

from course.ranks import parser, print_rank, setup
from lessons.broken import explain, same_on_every_rank

NEEDS = ("exactly 4 ranks", lambda n: n == 4)


# --8<-- [start:main]
def main():
    args = parser(__doc__).parse_args()
    with setup(args, NEEDS, relaunch=True, trace=args.trace) as ctx:
        calls = [[0, 1], [2, 3]]
        if ctx.rank >= 2:
            calls.reverse()  # the mistake: ranks 2-3 create their own pair first
        with explain(
            "ranks 0-1 create [0, 1] then [2, 3], ranks 2-3 the other way round: "
            "the same group name would mean different groups"
        ):
            same_on_every_rank("the new_group calls, in order", calls)
        groups = {tuple(ranks): dist.new_group(ranks) for ranks in calls}
        mine = groups[(0, 1) if ctx.rank < 2 else (2, 3)]
        x = torch.full((2,), float(ctx.rank + 1), device=ctx.device)
        dist.all_reduce(x, group=mine)
        print_rank(f"sum over my pair: {x.tolist()}")
    # --8<-- [end:main]


if __name__ == "__main__":
    main()
