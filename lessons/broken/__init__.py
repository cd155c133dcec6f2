"""Programs that are wrong on purpose, one mistake each. Run one, read what torch says, then fix it.

    collective_mismatch.py     rank 0 calls all_reduce while rank 1 calls broadcast
    shape_mismatch.py          all_reduce of a (3,) tensor on one rank, (4,) on the others
    skipped_collective.py      one rank runs out of batches and skips the last all_reduce
    send_send_deadlock.py      both ranks send first, so neither ever receives
    recv_wrong_shape.py        the receiver allocates fewer elements than the sender sends
    new_group_members_only.py  new_group called only by the ranks that are in the group
    group_order.py             two groups created in a different order on different ranks
    missing_wait.py            a tensor changed after isend, before wait()
    recv_wrong_source.py       a recv that names a rank which never sends to it
    broadcast_src_differs.py   ranks name different roots in one broadcast
    asleep.py                  one rank polls in Python for a file that never comes
    dtype_mismatch.py          all_reduce of float64 on one rank, float32 on the others
(The last mistake on the Debugging page, an odd world size for lesson 06, is lesson 06 itself
started on 3 ranks.) Each file's docstring says what is wrong, the command, what you should see
and the fix; docs/debugging.md shows every one's real output. A mismatch runs first with --debug
(TORCH_DISTRIBUTED_DEBUG=DETAIL and a 10 s timeout), which is how torch names most of them; a
hang or a bad new_group runs with default flags, where the course itself names it
(course/watch.py: the new_group check, and where every rank is after --stuck-after seconds).
"""

import contextlib
import re

import torch.distributed as dist

from course.ranks import print_rank


@contextlib.contextmanager
def explain(why):
    """If the block fails, add one plain sentence under torch's own message (which stays)."""
    try:
        yield
    except Exception:
        print_rank(f"why: {why}")
        raise


def same_on_every_rank(what, value):
    """Raise on every rank, naming who differs, unless every rank passes an equal `value`.

    For what torch does not check: that all ranks create the same groups in the same order,
    plan the same number of steps, ... Call it before the collectives that depend on it."""
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, value)  # on the default group, which all ranks share
    versions = {}  # repr of a value -> the ranks that passed it
    for rank, theirs in enumerate(everyone):
        versions.setdefault(repr(theirs), []).append(rank)
    if len(versions) > 1:
        said = " but ".join(
            f"{shown} on rank{'s' * (len(who) > 1)} {', '.join(map(str, who))}"
            for shown, who in versions.items()
        )
        raise RuntimeError(f"the ranks disagree on {what}: {said}")


def documented_runs(path):
    """The commands under "Run it" in a broken program's docstring, as (nproc, args): what the
    tests run and tools/capture_debug_outputs.py shows on the Debugging page."""
    doc = re.search(r'"""(.*?)"""', path.read_text(), re.S)[1]
    return [
        (int(m[1]), m[2].split())
        for m in re.finditer(
            r"^\s*torchrun --nproc-per-node (\d+) lessons/broken/\w+\.py([^#\n]*)", doc, re.M
        )
    ]
