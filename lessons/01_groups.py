"""Lesson 01 - process groups: subsets of ranks with collectives of their own, and how to make them.

The idea
    A process group is a subset of the ranks with its own communicator: a collective on it
    involves only its members. `dist.new_group(ranks)` makes one, and it has a rule: EVERY rank
    calls it for EVERY group, in the SAME order, even ranks that are not in the group. So the
    pattern is "create all, keep yours": loop over all the groups, keep the one you are in.
    Why: torch names a group by counting new_group calls on each rank ("1", "2", ...) and its
    members meet under that name in the rendezvous store. Skip a call, or change the order, and
    one name means different groups on different ranks: they cross wires or wait for each other
    until a timeout. On GPUs there is a second reason: with a device bound (as setup() does),
    new_group splits the world's NCCL communicator, and every rank must take part in a split.
    Groups can have different backends in one program (NCCL for GPU tensors, gloo for CPU
    tensors and Python objects), and a group is also a channel: two groups over the same pair
    of ranks are two independent message streams.

Run it
    torchrun --nproc-per-node 4 lessons/01_groups.py
    python lessons/01_groups.py --nproc 2               # plain python: starts torchrun for you
    torchrun --nproc-per-node 4 lessons/01_groups.py --broken order     # break the rule: fails
    torchrun --nproc-per-node 4 lessons/01_groups.py --broken members   # in ~10 s, and says why

What you should see (4 ranks, no GPU)
    [rank 0] no GPU: using gloo on CPU
    [rank 0] rank  pair    name  seen through it  sum   <- one row per rank, gathered on gloo
    [rank 0]    0  [0, 1]     1  [0, 1]             3
    [rank 0]    1  [0, 1]     1  [0, 1]             3
    [rank 0]    2  [2, 3]     2  [2, 3]             7   <- "2": the 2nd new_group call made it
    [rank 0]    3  [2, 3]     2  [2, 3]             7
    [rank 0] checked: every pair group reaches exactly its 2 members; all_reduce in it gives the
             pair's sum of rank+1 (2r+3 for the pair r, r+1)
    [rank 0] checked: a CPU tensor summed on the gloo group = 60, the formula gives 60
             (backends: pairs gloo, CPU group gloo)
    [rank 0] checked: one group, two messages: the first recv posted got the first message sent
             (a landed in b's buffer and b in a's)
    [rank 0] checked: two groups, two channels: each message reached its own buffer whatever the
             order the recvs were posted in
    [rank 0] Next: exercise 01.1 (tp_dp_groups above). Check it: python -m lessons.check 01
On GPUs the pair groups are NCCL and the CPU group gloo. Setup comes from course/ranks.py.
"""

import datetime

import torch
import torch.distributed as dist

from course.ranks import EVEN, parser, print0, print_rank, setup, usage_error
from course.watch import unchecked_new_group  # --broken: torch's new_group, not the course's

NEEDS = EVEN  # the lesson pairs ranks up: 0-1, 2-3, ...
# --broken: how long a group may take to connect before it fails. gloo retries the connection
# for about 5 times this, so a broken run ends in ~10 s instead of torch's default 30 minutes.
BROKEN_TIMEOUT_S = 2.0


# --8<-- [start:create]
def groups_for(layout, rank, timeout):
    """Create every group in `layout` (a list of rank lists) and return the one `rank` is in.

    Every rank runs this with the same layout, so every rank makes the same new_group calls in
    the same order. A rank outside a group gets GroupMember.NON_GROUP_MEMBER back: not kept.
    """
    mine = None
    for ranks in layout:
        # new_group does not inherit init_process_group's timeout: without one, 30 min on gloo
        group = dist.new_group(ranks, timeout=timeout)
        if rank in ranks:
            mine = group
    return mine
    # --8<-- [end:create]


# --8<-- [start:use]
def check_pair_group(ctx, pair, pair_group, cpu_group):
    """Prove the wiring: who answers through the group, and what all_reduce in it gives."""
    seen = [torch.zeros(1, dtype=torch.int64, device=ctx.device) for _ in pair]
    dist.all_gather(seen, torch.tensor([ctx.rank], device=ctx.device), group=pair_group)
    seen = [t.item() for t in seen]  # the global ranks at the other ends, in group-rank order
    total = torch.tensor([ctx.rank + 1.0], device=ctx.device)
    dist.all_reduce(total, group=pair_group)  # only the pair takes part
    expected = sum(r + 1 for r in pair)  # the single-process answer
    assert seen == pair and total.item() == expected, (
        f"rank {ctx.rank}: pair group {pair} reached {seen} and summed to {total.item()}, "
        f"expected {pair} and {expected}"
    )
    # One row per rank, printed by rank 0. gather_object pickles: a CPU job, so the gloo group.
    row = (ctx.rank, pair, pair_group.group_name, seen, total.item())
    rows = [None] * ctx.world_size if ctx.rank == 0 else None
    dist.gather_object(row, rows, dst=0, group=cpu_group)
    print0("rank  pair    name  seen through it  sum")
    for r, ranks, name, met, s in rows or []:
        print0(f"{r:>4}  {str(ranks):<6} {name:>5}  {str(met):<15} {s:>4g}")
    print0(
        "checked: every pair group reaches exactly its 2 members; all_reduce in it gives "
        "the pair's sum of rank+1 (2r+3 for the pair r, r+1)"
    )


def check_cpu_group(ctx, pair_group, cpu_group):
    """A CPU tensor next to device tensors: it goes over the gloo group."""
    count = torch.tensor([10 * ctx.rank], dtype=torch.int64)  # say, samples seen: on the CPU
    dist.all_reduce(count, group=cpu_group)  # NCCL could not take a CPU tensor
    expected = 10 * sum(range(ctx.world_size))
    assert count.item() == expected, f"rank {ctx.rank}: {count.item()} != {expected}"
    print0(
        f"checked: a CPU tensor summed on the gloo group = {count.item()}, the formula gives "
        f"{expected} (backends: pairs {dist.get_backend(pair_group)}, "
        f"CPU group {dist.get_backend(cpu_group)})"
    )
    # --8<-- [end:use]


# --8<-- [start:channels]
def two_channels(ctx, pair, channel_a, channel_b):
    """The even rank of each pair sends `a` then `b`; the odd rank posts the recv for `b` first.

    Messages between one pair on one group are matched in order: first recv posted, first
    message sent. A second group is a second stream with its own order. The channels are gloo
    groups of all ranks (p2p between two members needs no one else), on CPU tensors, on every
    machine: NCCL gives each group its own stream too, but asks that every rank issue its
    operations on several groups in one consistent order, which this demo breaks on purpose.
    (gloo can also tell messages apart by `tag`; NCCL ignores tags: groups work on both.)
    """
    partner = pair[1] if ctx.rank == pair[0] else pair[0]
    a, b = torch.full((4,), 1.0), torch.full((4,), 2.0)
    results = {}
    for how, group_b in (("one group", channel_a), ("two groups", channel_b)):  # a: channel_a
        if ctx.rank == pair[0]:
            works = [dist.isend(a, partner, group=channel_a), dist.isend(b, partner, group=group_b)]
        else:
            got_a, got_b = torch.zeros_like(a), torch.zeros_like(b)
            works = [
                dist.irecv(got_b, partner, group=group_b),  # b's recv first, on purpose
                dist.irecv(got_a, partner, group=channel_a),
            ]
        for work in works:
            work.wait()  # not before: a send buffer may still be read, a recv buffer be filling
        if ctx.rank == pair[1]:
            results[how] = (got_a[0].item(), got_b[0].item())
    if ctx.rank == pair[1]:
        # One group: the recv posted first (got_b) got the message sent first (a), and so on.
        assert results == {"one group": (2.0, 1.0), "two groups": (1.0, 2.0)}, (
            f"rank {ctx.rank}: received (a, b) = {results}, expected (2, 1) then (1, 2)"
        )
    print0(
        "checked: one group, two messages: the first recv posted got the first message sent "
        "(a landed in b's buffer and b in a's)\nchecked: two groups, two channels: each message "
        "reached its own buffer whatever the order the recvs were posted in"
    )
    # --8<-- [end:channels]


# --8<-- [start:broken]
def break_the_rule(ctx, how, debug):
    """--broken order|members: break the rule on purpose, see what torch does, explain it."""
    if ctx.backend == "nccl" or ctx.world_size < 4:
        usage_error(
            "--broken runs on gloo with at least 4 ranks (with 2, every group holds "
            "every rank and nothing can go wrong): torchrun --nproc-per-node 4 "
            f"lessons/01_groups.py --backend gloo --broken {how}"
        )
    if debug:  # the broken groups fail in ~10 s, as long as --debug lets the world group wait
        usage_error("--broken with --debug: the world group would time out too. Leave out --debug.")
    pairs = [[r, r + 1] for r in range(0, ctx.world_size, 2)]
    if how == "order":  # the second half of the ranks creates the groups in reverse order
        plan = pairs if ctx.rank < ctx.world_size // 2 else pairs[::-1]
    else:  # "members": each rank creates only the group it is in
        plan = [ranks for ranks in pairs if ctx.rank in ranks]
    mine = pairs[ctx.rank // 2]
    try:
        with unchecked_new_group():  # the course would stop this at once: see torch alone
            group = groups_for(plan, ctx.rank, datetime.timedelta(seconds=BROKEN_TIMEOUT_S))
        seen = [torch.zeros(1, dtype=torch.int64) for _ in mine]
        dist.all_gather(seen, torch.tensor([ctx.rank]), group=group)
        seen = [t.item() for t in seen]
        outcome = "connected as planned" if seen == mine else f"crossed wires: met {seen}"
    except RuntimeError as err:  # gloo's own words, minus the source file it names
        outcome = "failed: " + str(err).split("] ")[-1].split(". ")[0][:70]
    # The world group is still sound: compare what each rank did, on every rank.
    reports = [None] * ctx.world_size
    dist.all_gather_object(reports, (plan, outcome))
    print0("rank  new_group calls, in order  what happened")
    for r, (made, said) in enumerate(reports):
        print0(f"{r:>4}  {' '.join(map(str, made)):<26} {said}")
    meanings = {}  # call number -> {the group that call made: the ranks that made it so}
    for r, (made, _) in enumerate(reports):
        for number, ranks in enumerate(made, start=1):
            meanings.setdefault(number, {}).setdefault(str(ranks), []).append(r)
    number = next(n for n, groups in meanings.items() if len(groups) > 1)
    clash = " but ".join(f"{g} on ranks {rs}" for g, rs in meanings[number].items())
    print0(
        f"What went wrong: torch names a group by counting new_group calls on each rank, so "
        f"group '{number}' was {clash}.\nBoth met under that one name in the store: some "
        "ranks waited for peers that never came, others may connect to another group's "
        "ranks\n(crossed wires: a wrong sum, no error). Fix: every rank creates every group, "
        "in the same order, and keeps its own (groups_for)."
    )
    print_rank(
        f"error: --broken {how}: the ranks made different new_group calls; group "
        f"'{number}' was {clash} (explained on rank 0)"
    )
    raise SystemExit(1)
    # --8<-- [end:broken]


# --8<-- [start:ex-01-1]
def tp_dp_groups(tp_size: int, timeout: datetime.timedelta):
    """Exercise 01.1: split the world into tensor-parallel (TP) and data-parallel (DP) groups.

    TP groups are blocks of `tp_size` consecutive ranks ([0, 1], [2, 3], ... for tp_size 2);
    a DP group holds the ranks at the same position in every block ([0, 2], [1, 3], ...).
    Create all of them on every rank (pass `timeout` to new_group) and return
    (tp_group, dp_group): the two groups this rank is in.
    """
    # YOUR CODE BELOW
    raise NotImplementedError(
        "Exercise 01.1: create every TP group, then every DP group, on "
        "every rank, and return the two this rank is in (about 6 lines)"
    )
    # --8<-- [end:ex-01-1]


def main():
    p = parser(__doc__)
    p.add_argument(
        "--broken",
        choices=["order", "members"],
        help="break the rule on purpose: ranks create groups in different orders, "
        "or only members call new_group. Fails in ~10 s and explains.",
    )
    args = p.parse_args()
    # course/ranks.py: init, backend, device, and teardown however the block ends
    with setup(args, NEEDS, relaunch=True, trace=args.trace) as ctx:
        if args.broken:
            break_the_rule(ctx, args.broken, args.debug)
        timeout = datetime.timedelta(seconds=args.timeout)
        pairs = [[r, r + 1] for r in range(0, ctx.world_size, 2)]
        pair = pairs[ctx.rank // 2]
        pair_group = groups_for(pairs, ctx.rank, timeout)  # the world's backend: NCCL on GPUs
        # A group over all ranks on gloo, for CPU tensors and objects. Every rank is a member.
        cpu_group = dist.new_group(backend="gloo", timeout=timeout)
        check_pair_group(ctx, pair, pair_group, cpu_group)
        check_cpu_group(ctx, pair_group, cpu_group)
        second_cpu_group = dist.new_group(backend="gloo", timeout=timeout)  # a 2nd channel
        two_channels(ctx, pair, cpu_group, second_cpu_group)
        print0("Next: exercise 01.1 (tp_dp_groups above). Check it: python -m lessons.check 01")


if __name__ == "__main__":
    main()
