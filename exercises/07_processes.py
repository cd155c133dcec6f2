"""Checks for lesson 07's exercises (lessons/07_processes.py). Run them: python -m lessons.check 07

Each check runs on every rank, calls the learner's function and returns (yours, expected), the
expected value computed in one process, without collectives. It also watches how your function
gets there (unittest.mock: torch.multiprocessing.start_processes, which start_children calls,
works as before and records what each call starts), so that an answer which skips what the
exercise teaches, a world of children of their own, fails, saying why.
"""

import importlib
from unittest import mock

import torch.distributed as dist
import torch.multiprocessing as torch_mp

from course.check import lesson_module

lesson = lesson_module("07")  # lessons/07_processes.py, for child_world

# The lesson's child function, as the check's namespace has it and as start_children passes it
# (importable(): the module a spawned child can import), so either counts as the lesson's.
CHILD_WORLDS = (lesson.child_world, importlib.import_module("lessons.07_processes").child_world)


def started(call):
    """(fn, args, nprocs) of one recorded start_processes call, passed by position or name."""
    given = dict(zip(("fn", "args", "nprocs"), call.args), **call.kwargs)
    return given.get("fn"), tuple(given.get("args", ())), given.get("nprocs", 1)


def own_world(calls, role_ranks, rank, ports):
    """True if every child ran the lesson's child_world in a world of the role's size, on a
    port its role shares and the other role does not; else why not. No call: nothing to say
    here, "one child per rank" says it."""
    for fn, args, _ in calls:
        name = getattr(fn, "__name__", repr(fn))
        if fn not in CHILD_WORLDS:
            return (
                f"no: its child ran {name}, not the lesson's child_world; the child must "
                "join a world of its role's own (start_children does it) and gather the parents "
                "and sum the values there, not the parents in a group of theirs"
            )
        if len(args) < 2 or args[1] != len(role_ranks):
            size = args[1] if len(args) > 1 else None
            return (
                f"no: child_world got {size} as its world's size (its args: port, size, ...); "
                f"one child per rank of its role, {role_ranks}, makes {len(role_ranks)}"
            )
    if not calls:
        return True
    mine = [ports[r] for r in role_ranks]
    others = [ports[r] for r in range(len(ports)) if r not in role_ranks]
    if any(p != ports[rank] for p in mine) or ports[rank] in others:
        return (
            f"no: the children of ranks {role_ranks} got ports {mine}, the other role's {others}; "
            "a role's children share one port, which the other role's do not use"
        )
    return True


def check_role_worlds(ctx, start_role_world):
    """Runs on every rank: the first half are students, the second half teachers. Each rank's
    child must see exactly its role's parents and sum exactly their values."""
    half = ctx.world_size // 2
    role_ranks = list(range(half)) if ctx.rank < half else list(range(half, ctx.world_size))
    value = 10.0**ctx.rank  # the sum's digits say which ranks' children were in the world
    watched = mock.patch.object(torch_mp, "start_processes", wraps=torch_mp.start_processes)
    with watched as start_processes:
        yours = start_role_world(role_ranks, value)
    calls = [started(call) for call in start_processes.call_args_list]
    children = sum(nprocs for _, _, nprocs in calls)
    # Each rank's child_world port (None if it started none), so that every rank can see
    # whether its role shares one and the other role has another; every rank gathers, in step.
    port = next((args[0] for fn, args, _ in calls if fn in CHILD_WORLDS and args), None)
    ports = [None] * ctx.world_size
    dist.all_gather_object(ports, port)
    one_child = children == 1 or (
        f"no: it started {children} children (torch.multiprocessing.start_processes, which "
        "start_children calls); the exercise starts one child per rank, and the children, in a "
        "world of their role's own, gather the parents and sum the values"
    )
    world = own_world(calls, role_ranks, ctx.rank, ports)
    if isinstance(yours, dict):
        yours = {**yours, "one child per rank": one_child, "a world of the role's own": world}
    expected = {
        "parents": role_ranks,
        "sum": sum(10.0**r for r in role_ranks),
        "one child per rank": True,
        "a world of the role's own": True,
    }
    return yours, expected


# Exercise id -> (its check, the function(s) you write, defined in the lesson).
EXERCISES = {"07.1": (check_role_worlds, "start_role_world")}
# The checks run on 4 ranks, then on 2: an answer written for 4 ranks only fails.
WORLD_SIZES = (4, 2)
