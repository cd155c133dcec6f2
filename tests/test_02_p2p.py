"""Lesson 02 beyond the generic runs: the send-send deadlock demo fails by itself, fast, and
explains; the reference handshake (solutions/02_p2p.py, what later lessons copy) turns every
bad header into a clear ValueError on both ranks instead of a hang or wrong data."""

from conftest import ROOT, run_ranks, text

LESSON = ROOT / "lessons" / "02_p2p.py"


def test_send_send_deadlock_fails_by_itself_and_explains():
    result = run_ranks(LESSON, 2, ["--broken", "deadlock"], timeout=90)
    out = text(result)
    assert result.returncode not in (0, -1), out  # failed, and was not stopped for hanging
    assert not result.timed_out and "Traceback" not in out, out
    for rank in range(2):
        # Each rank says what happened to its send (it timed out, or saw the connection closed
        # when its peer's timed out first), then why.
        error = f"[rank {rank}] error: --broken deadlock: send failed: "
        said = [line for line in out.splitlines() if line.startswith(error)]
        assert said and "Both ranks of each pair called send() first and waited" in said[0], out
    assert "[rank 0] What went wrong: each rank sent first" in out


# Rank 0 sends something bad, rank 1 receives it with the reference recv_tensor. Each case has
# its own group, so one that went wrong cannot disturb the next; every rank prints what it got.
PROGRAM = """
import datetime, runpy, torch, torch.distributed as dist
from course.ranks import parser, print_rank, setup
ns = runpy.run_path("lessons/02_p2p.py")  # the lesson's namespace, without running main()
exec(compile(open("solutions/02_p2p.py").read(), "solutions/02_p2p.py", "exec"), ns)
TENSOR, HEADER = ns["TENSOR"], ns["HEADER"]
def raw(*fields):  # a header as a buggy or foreign sender might fill it
    return torch.tensor([*fields, *[0] * (len(HEADER) - len(fields))])
CASES = {"complex": torch.zeros(2, dtype=torch.complex64), "9-D": torch.zeros((1,) * 9),
         "not a header": torch.arange(len(HEADER)), "dtype code": raw(TENSOR, 99, 1, 2),
         "ndim": raw(TENSOR, 0, 9), "size": raw(TENSOR, 0, 2, 3, -1)}
with setup(parser("").parse_args([])) as ctx:
    for name, tensor in CASES.items():
        group = dist.new_group([0, 1], timeout=datetime.timedelta(seconds=10))
        try:
            if ctx.rank == 0 and name in ("complex", "9-D"):
                ns["send_tensor"](tensor, 1, group)
            elif ctx.rank == 0:
                dist.send(tensor, 1, group)
            else:
                ns["recv_tensor"](0, ctx.device, group)
            print_rank(f"{name}: no error")
        except ValueError as err:
            print_rank(f"{name}: ValueError: {err}")
"""


def test_reference_handshake_refuses_bad_headers_on_both_ranks(tmp_path):
    program = tmp_path / "bad_headers.py"
    program.write_text(PROGRAM)
    result = run_ranks(program, 2, timeout=90)
    out = text(result)
    assert result.returncode == 0 and not result.stuck, out
    expected = [
        "[rank 0] complex: ValueError: send_tensor to rank 1: cannot send a tensor of dtype "
        "torch.complex64: the header can name only",
        "[rank 1] complex: ValueError: recv_tensor from rank 0: the sender refused its tensor",
        "[rank 0] 9-D: ValueError: send_tensor to rank 1: cannot send a tensor of 9 dimensions: "
        "the header has room for MAX_NDIM = 8",
        "[rank 1] 9-D: ValueError: recv_tensor from rank 0: the sender refused its tensor",
        "[rank 1] not a header: ValueError: recv_tensor from rank 0: not a header (kind 0 is "
        "neither TENSOR (20202) nor REFUSED (20203)): sender and receiver are out of step",
        "[rank 1] dtype code: ValueError: recv_tensor from rank 0: not a header (dtype code 99 "
        "is not in 0..8)",
        "[rank 1] ndim: ValueError: recv_tensor from rank 0: not a header (ndim 9 is not in 0..8)",
        "[rank 1] size: ValueError: recv_tensor from rank 0: not a header (a negative size in "
        "[3, -1])",
    ]
    for line in expected:
        assert line in out, f"missing {line!r} in:\n{out}"


TOOLBOX = """
import datetime, torch, torch.distributed as dist
from course import header
from course.ranks import parser, print_rank, setup
CASES = {"complex": torch.zeros(2, dtype=torch.complex64), "9-D": torch.zeros((1,) * 9),
         "not a header": torch.arange(len(header.HEADER))}
with setup(parser("").parse_args([])) as ctx:
    for name, tensor in CASES.items():
        group = dist.new_group([0, 1], timeout=datetime.timedelta(seconds=10))
        try:
            if ctx.rank == 0 and name != "not a header":
                header.send_tensor(tensor, 1, group)
            elif ctx.rank == 0:
                dist.send(tensor, 1, group)
            else:
                header.recv_tensor(0, group, ctx.device)
            print_rank(f"{name}: no error")
        except ValueError as err:
            print_rank(f"{name}: ValueError: {err}")
"""


def test_the_toolbox_copy_of_the_handshake_refuses_as_lesson_02_teaches(tmp_path):
    """course/header.py (lesson 06's messages) follows lesson 02's rule: a tensor the header
    cannot describe is REFUSED, and both ranks raise at once (the receiver used to wait for its
    timeout, or, for 9 dimensions, gloo aborted it on a header longer than it expected)."""
    program = tmp_path / "toolbox_headers.py"
    program.write_text(TOOLBOX)
    result = run_ranks(program, 2, timeout=90)
    out = text(result)
    assert result.returncode == 0 and not result.stuck and result.seconds < 60, out
    for name, dims in (("complex", "torch.complex64 and 1"), ("9-D", "torch.float32 and 9")):
        assert (
            f"[rank 0] {name}: ValueError: send_tensor to rank 1: a tensor of dtype {dims} " in out
        )
        assert f"[rank 1] {name}: ValueError: recv_tensor from rank 0: it refused its tensor" in out
    assert "[rank 1] not a header: ValueError: recv_tensor from rank 0: not a header ([0, 1" in out
