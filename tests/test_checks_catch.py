"""The exercise checks of lessons 00-08 hold an answer to what the exercise teaches, not only to
its numbers: an answer that gets the numbers right by skipping the point (tests/wrong/*_skips.py
and the like) is a mismatch whose verdict says why, in one line. And a check never crashes on
an answer that returns nothing: it says what is wrong instead. And a wrong answer's verdict fits
on a screen, naming an obvious relation (yours = 4 x expected) when there is one. And an answer
written for 4 ranks only (the world's size hard-coded) fails on the lesson's other world size."""

import ast
import re

import pytest

from course.check import exercise_file, exercises_of, run_check

from conftest import ROOT

WRONG = ROOT / "tests" / "wrong"
LESSONS = ["00", "01", "02", "03", "04", "05", "06", "07", "08", "10", "11", "12", "13"]

# Each file's answers get the numbers right but skip the point: {verdict's key: words it says}.
# Those keys, and only those, must differ from the expected answer.
SKIPS = {
    "00_hello_skips.py": {"one all_reduce": "asks for exactly one"},
    "01_groups_skips.py": {
        "every group, in one order, on every rank": "every rank must make all of [[0, 1], [2, 3]"
    },
    "01_groups_hard_coded.py": {
        "members at tp_size 1: tp and dp": "([0, 1], [0, 2])",
        "members at tp_size 4: tp and dp": "([0, 1], [0, 2])",
    },
    "02_p2p_skips.py": {
        "send_tensor follows the protocol": "the protocol is the header [20202,",
        "a ring of isend/irecv": "it called dist.all_reduce; the exercise builds the sum from",
    },
    "02_p2p_not_a_ring.py": {"a ring of isend/irecv": "sends only to rank 1 and receives only"},
    "02_p2p_imported.py": {"a ring of isend/irecv": "it sent 0 messages (0 numbers) to rank 1"},
    "03_collectives_skips.py": {
        "shared only a max and a sum": "it called dist.all_reduce 0 times",
        "shared only a max and a sum per row": "on [4, 120] numbers",
    },
    "04_scatter_p2p.py": {
        "all_gather, no all_reduce or broadcast": "dist.batch_isend_irecv 1, all_gather 0"
    },
    "04_scatter_skips.py": {
        "one scatter": "dist.scatter 0, dist.broadcast 1",
        "all_gather, no all_reduce or broadcast": "dist.all_reduce 1, dist.broadcast 0",
    },
    "05_hooks_skips.py": {"one async all_reduce per bucket": "by step: [8, 8]"},
    "05_hooks_at_the_end.py": {"overlaps backward": "started after bucket 1's first gradient"},
    "05_hooks_waits.py": {"overlaps backward": "wait() before backward returned"},
    "05_hooks_unused.py": {
        "finish() when a parameter got no gradient": "finish() returned, though ['aux_head.weight'"
    },
    "06_distill_skips.py": {"one all_reduce per step": "it called dist.all_reduce [3, 3] times"},
    "07_processes_no_child.py": {"one child per rank": "it started 0 children"},
    "07_processes_dummy_child.py": {
        "a world of the role's own": "its child ran sleep, not the lesson's child_world"
    },
    "08_rpc_sync.py": {"asks one batch ahead": "after [0, 1, 2, 3, 4, 5] of the student's"},
    "08_rpc_disguise.py": {
        "waits after the step on the batch before": "after [0, 1, 2, 3, 4] of the student's steps"
    },
    "10_reshard_no_turn.py": {"a piece smaller than its holders": "rotate who sends by `turn`"},
    "11_colocate.py": {"copies": "one fused call copies every span"},
    "12_live_engine.py": {"steps run together": "no: at most 1 at a time"},
    "12_live_engine_overlap.py": {"steps inside a commit": ""},
    "12_live_engine_polling.py": {"waits": "on a timer: time.sleep inside your lock"},
    "12_live_engine_no_preference.py": {"a step asking while a commit waits": "went first"},
}
SCREEN = 25  # lines a wrong answer's verdict may take, 4 ranks, per exercise


def exercises_in(path):
    """The exercise ids whose functions `path` defines (its other exercises are not run)."""
    defined = {f.name for f in ast.parse(path.read_text()).body if isinstance(f, ast.FunctionDef)}
    lesson = path.name[:2]
    return [e for e in exercises_of(lesson) if set(function_names(lesson)[e]) <= defined]


def function_names(lesson):
    """{exercise id: the names of the functions the learner writes}, read from EXERCISES."""
    for node in ast.parse(exercise_file(lesson).read_text()).body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "EXERCISES":
            return {
                key.value: [n.value for n in value.elts[1:]]
                for key, value in zip(node.value.keys, node.value.values)
            }
    return {}


def mismatched_keys(lines):
    """The keys of yours/expected that a mismatch report names: `[rank N]   key:` lines, and
    those a further rank's one line names (`[ranks 2, 3] 05.1: differs too, in: a, b`)."""
    text = "\n".join(lines)
    keys = set(re.findall(r"^\[ranks? [\d, ]+\]   (\S.*):$", text, re.M))
    return keys | {
        k for ks in re.findall(r"differs too, in: (.*)$", text, re.M) for k in ks.split(", ")
    }


# A rank killed by an abort in torch's C++ (seen: std::bad_alloc in RPC's confirmPendingUser,
# under a loaded CI machine), not by the answer or the check.
TORCH_ABORT = "terminate called after throwing an instance of"


def said(lines):
    """The report as one text, without rank prefixes: a verdict's words, wrapped or not."""
    return " ".join(re.sub(r"^\[ranks? [\d, ]+\]", "", line).strip() for line in lines)


@pytest.mark.parametrize("name", SKIPS)
def test_check_says_why_an_answer_that_skips_the_point_fails(name):
    exercises = exercises_in(WRONG / name)
    status, lines = run_check(exercises, WRONG / name)  # on each of the lesson's world sizes
    out = "\n".join(lines)
    if TORCH_ABORT in out:  # once in ~10 CI runs, 08's RPC aborts inside torch: says nothing of
        status, lines = run_check(exercises, WRONG / name)  # the check; run it once more
        out = "\n".join(lines)
    assert status == {e: "mismatch" for e in exercises}, out
    assert mismatched_keys(lines) == set(SKIPS[name]), out  # the numbers are right: only why
    for key, words in SKIPS[name].items():
        assert words in said(lines), f"{key}: the report does not say {words!r}\n{out}"
    assert len(lines) <= SCREEN * len(exercises), f"{len(lines)} lines: more than a screen\n{out}"


# Written for 4 ranks (a world size hard-coded): each passes on 4 ranks and must fail on the
# lesson's other world size, named here.
FOUR = {
    "00_hello_four.py": 3,
    "02_p2p_four.py": 3,
    "05_hooks_four.py": 3,
    "06_distill_four.py": 2,
}


@pytest.mark.parametrize("name", FOUR)
def test_an_answer_written_for_4_ranks_fails_on_another_world_size(name):
    exercises = exercises_in(WRONG / name)
    status, lines = run_check(exercises, WRONG / name)
    out = "\n".join(lines)
    assert status == {e: "mismatch" for e in exercises}, out
    assert f"on {FOUR[name]} ranks (it passed on 4), each rank says:" in lines, out  # 4: passed
    assert len(lines) <= SCREEN * len(exercises), f"{len(lines)} lines: more than a screen\n{out}"


def test_a_missing_division_is_named_as_a_factor_in_a_screen_of_lines():
    """05.1 without `/ world_size`: 16 gradients, each 4 x too big, on 4 ranks; the verdict says
    "4 x expected" in at most a screen of lines, none wider than a terminal."""
    status, lines = run_check(["05.1"], WRONG / "05_hooks_no_divide.py", 4)
    out = "\n".join(lines)
    assert status == {"05.1": "mismatch"}, out
    assert "yours = 4 x expected, everywhere" in out, out
    assert len(lines) <= SCREEN and max(map(len, lines)) <= 160, out


@pytest.mark.parametrize("lesson", LESSONS)
def test_check_says_what_is_wrong_with_an_answer_that_returns_nothing(lesson, tmp_path):
    """Every function of the lesson's exercises returns None at once: a mismatch, not a crash
    of the check's own code (which the runner would report as an error)."""
    names = {n for ns in function_names(lesson).values() for n in ns}
    nothing = tmp_path / "nothing.py"
    nothing.write_text("".join(f"def {n}(*args, **kwargs):\n    return None\n\n" for n in names))
    status, lines = run_check(exercises_of(lesson), nothing, 4)
    assert set(status.values()) == {"mismatch"}, "\n".join(lines)


def test_lesson_05s_own_ddp_stops_on_a_parameter_without_gradient(tmp_path):
    """overlap_ddp (the lesson's DDP, one bucket per parameter) through exercise 05.1's check:
    it is no bucketed answer, but it must raise, naming the parameters that got no gradient."""
    answer = tmp_path / "overlap.py"
    answer.write_text(
        "def bucketed_ddp(model, bucket_bytes, log):\n    return overlap_ddp(model, log)\n"
    )
    status, lines = run_check(["05.1"], answer, 4)
    assert status == {"05.1": "mismatch"}, "\n".join(lines)  # its buckets are not 05.1's
    assert "finish() when a parameter got no gradient" not in mismatched_keys(lines), lines
