"""Broken on purpose: new_group called only by the ranks that are in the group.

What is wrong
    new_group must be called by every rank, for every group, even for groups it is not in:
    each call takes the group's name from a counter kept on each rank, and all ranks must agree
    on the names. Here ranks 0 and 1 create only the pair [0, 1], ranks 2 and 3 only the pair
    [2, 3]: both pairs get the name "1", and their collectives can meet the wrong partners.
    torch does not notice: the pairs' all_reduce gave 5.0 where 3.0 was right, or hung, from
    one run to the next.

Run it
    torchrun --nproc-per-node 4 lessons/broken/new_group_members_only.py

What you should see
    Every rank fails at once, in its new_group call, before any group exists: "the ranks
    disagree on new_group call 1: [0, 1] on ranks 0, 1 (at ...) but [2, 3] on ranks 2, 3
    (at ...)", and the rule. The course compares each rank's k-th new_group call with the
    others' (course/watch.py), on every run: torch itself has no such check. (Had ranks 2 and
    3 called no new_group at all, ranks 0 and 1 would say at --timeout that ranks 2, 3 made
    no call 1, and after --stuck-after seconds where every rank waits.)

The fix
    Every rank creates both pairs, in the same order, and keeps the one it is in:
    `pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]; mine = pairs[rank // 2]`.
"""

import torch
import torch.distributed as dist

from course.ranks import EVEN, parser, print_rank, setup

NEEDS = EVEN  # ranks pair up: [0, 1], [2, 3], ...


# --8<-- [start:main]
def main():
    args = parser(__doc__).parse_args()
    with setup(args, NEEDS, relaunch=True, trace=args.trace) as ctx:
        first = ctx.rank - ctx.rank % 2
        pair = dist.new_group([first, first + 1])  # the mistake: only the pair's own ranks call
        x = torch.full((2,), float(ctx.rank + 1), device=ctx.device)
        dist.all_reduce(x, group=pair)
        print_rank(f"sum over my pair: {x.tolist()}")
    # --8<-- [end:main]


if __name__ == "__main__":
    main()
