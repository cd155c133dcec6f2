"""distill_demo: the trainer lesson 06 grows into. Its distributed results against a single
process, its benchmark's byte counts against the formula, its bad inputs, a dying teacher, and
the pieces other code imports (models, data, losses)."""

import re
import sys
import textwrap

import pytest
import torch

from course import launcher
from distill_demo.__main__ import parse_args, validate
from distill_demo.data import MarkovData
from distill_demo.knowledge import kl_full, kl_topk, teacher_message
from distill_demo.models import make_student, make_teacher
from distill_demo.report import CheckFailed, Progress, check_loss_fell
from distill_demo.train import RECIPES, pretrain

from conftest import ROOT, reference_student, run_ranks, text

ENV = {"PYTHONPATH": str(ROOT)}  # so `-m distill_demo` is found from any working directory
SMALL = ["--steps", 4, "--teacher-steps", 3]  # a few steps: enough to tell a wrong answer


def demo(nproc, args, timeout=180, env=None):
    return run_ranks("distill_demo", nproc, args, timeout, {**ENV, **(env or {})})


@pytest.mark.parametrize(
    "nproc, ratio, transfer",
    [
        (2, "1:1", ["--transfer", "full"]),
        (4, "2:2", ["--transfer", "full", "--overlap", "off"]),
        (4, "1:3", ["--transfer", "topk", "--topk", 256]),  # k = vocab: the full distribution
        (4, "3:1", ["--transfer", "hidden"]),  # 3 teachers split one student's batch
    ],
    ids=["1:1-full", "2:2-full-no-overlap", "1:3-topk-all", "3:1-hidden"],
)
def test_students_match_one_process(tmp_path, nproc, ratio, transfer):
    saved = tmp_path / "student.pt"
    result = demo(nproc, ["--ratio", ratio, *transfer, *SMALL, "--out", tmp_path, "--save", saved])
    out = text(result)
    assert result.returncode == 0 and "Traceback" not in out, out
    teachers, students = map(int, ratio.split(":"))
    n_students = nproc * students // (teachers + students)
    assert f"[rank 0] teachers:students {ratio} on {nproc} ranks" in out
    assert (
        f"[rank 0] checked: every student holds the same weights (spread 0 over the student "
        f"group of {n_students})"
    ) in out
    assert "[rank 0] checked: each teacher answered 4 steps and stopped on the stop message" in out
    # the run's own check: the mean loss it reports at every step, and its weights
    assert "[rank 0] checked: losses and weights match one process" in out, out
    assert_same_weights(torch.load(saved), reference_student(n_students).state_dict())


def assert_same_weights(yours, expected, lr=1e-2, steps=4):
    """AdamW divides by sqrt(v): where a weight's gradient is a sum that cancels to nearly zero,
    rounding alone decides its sign and the step moves that weight by up to the learning rate.
    So: nearly every weight (all but 1 in 100) agrees to 1e-5, and none is further apart than
    AdamW can move a weight in `steps` steps. (Measured: at most 14 of 30176 apart.) A real
    mistake (a wrong average, rows out of order) moves most weights: 29258 for one student's
    data instead of two."""
    yours, expected = (torch.cat([d[k].reshape(-1) for k in expected]) for d in (yours, expected))
    apart = ~torch.isclose(yours, expected, rtol=1e-4, atol=1e-5)
    assert apart.float().mean() <= 1e-2, f"{int(apart.sum())} of {apart.numel()} weights differ"
    assert (yours - expected).abs().max() <= 2 * lr * steps


def test_the_reference_tells_a_wrong_answer_apart():
    """The comparison above can fail: one student's data instead of two is far outside it."""
    with pytest.raises(AssertionError):
        assert_same_weights(reference_student(1).state_dict(), reference_student(2).state_dict())


def test_default_run_reports_its_checks_and_draws(tmp_path):
    result = demo(4, ["--steps", 10, "--teacher-steps", 5, "--out", tmp_path])
    out = text(result)
    assert result.returncode == 0 and "Traceback" not in out, out
    for line in [
        "teachers:students 1:1 on 4 ranks: 2 teachers, 2 students",
        "  teacher 2 -> student 0 (whole batches)",
        "  teacher 3 -> student 1 (whole batches)",
        "bytes per step per student: 262,256 from its teachers, 2,160 to them (ids)",
        "checked: that is 256 tokens x 1,024 bytes (full) + 1 header",
        "checked: mean student loss fell from",
    ]:
        assert f"[rank 0] {line}" in out, f"missing {line!r} in:\n{out}"
    progress = [line for line in result.lines if line.startswith("[rank 0] train ")]
    assert len(progress) == 10, out  # a line a step: not a tty
    assert progress == [
        f"[rank 0] train {i}/10 loss " + line.split(" loss ")[1]
        for i, line in zip(range(1, 11), progress, strict=True)
    ]
    for name in ("06_demo_loss.png", "06_demo_timeline.png"):
        assert (tmp_path / name).stat().st_size > 10_000


def test_bench_reports_every_mode_with_the_bytes_the_formula_gives(tmp_path):
    result = demo(2, ["--bench", "--warmup", 1, "--repeats", 2, "--out", tmp_path])
    out = text(result)
    assert result.returncode == 0 and "Traceback" not in out, out
    rows = {}
    for line in result.lines:
        match = re.match(
            r"\[rank 0\] (full|topk|hidden) +(on|off) +([\d.]+) +([\d,]+) +([\d,]+) ", line
        )
        if match:
            rows[match[1], match[2]] = [float(match[3])] + [
                int(g.replace(",", "")) for g in match.groups()[3:]
            ]
    assert len(rows) == 6, out
    tokens, header = 8 * 32, 112  # --batch 8, --seq 32; one header per answer
    per_token = {"full": 4 * 256, "topk": 8 * (4 + 4), "hidden": 64 * 4}  # float32 on a CPU
    for (mode, overlap), (ms, bytes_in, bytes_out) in rows.items():
        assert ms > 0
        assert bytes_in == tokens * per_token[mode] + header, (mode, overlap)
        assert bytes_out == tokens * 8 + header  # int64 ids
    assert "[rank 0] top-k cuts bytes per step (in + out) by" in out
    assert "[rank 0] overlap on / off, step time: full " in out
    for name in ("06_demo_bench.png", "06_demo_bench_timeline.png"):
        assert (tmp_path / name).stat().st_size > 10_000


@pytest.mark.parametrize(
    "world, flags, message",
    [
        (
            4,
            ["--ratio", "1:2"],
            "--ratio 1:2 needs a multiple of 3 ranks (1 teacher and 2 students "
            "at a time), but was started with 4. Try: torchrun --nproc-per-node 3",
        ),
        (
            3,
            [],
            "--ratio 1:1 needs a multiple of 2 ranks (1 teacher and 1 student at a time), but "
            "was started with 3",
        ),
        (4, ["--ratio", "2-2"], "--ratio 2-2: write it as TEACHERS:STUDENTS"),
        (4, ["--ratio", "0:4"], "--ratio 0:4: write it as TEACHERS:STUDENTS with two positive"),
        (2, ["--topk", 300], "--topk 300 must be between 1 and --vocab 256"),
        (2, ["--topk", 0], "--topk 0 must be between 1 and --vocab 256"),
        (
            4,
            ["--ratio", "3:1", "--batch", 2],
            "--batch 2: each student splits its batch's rows over its 3 teachers",
        ),
        (2, ["--steps", 0], "--steps and --repeats must be at least 1"),
    ],
)
def test_bad_flags_are_named(capsys, monkeypatch, world, flags, message):
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit) as exit_:
        validate(parse_args(list(map(str, flags))), world)
    assert exit_.value.code == 2
    assert capsys.readouterr().out.startswith(f"[rank 1] error: {message}")


# Each of these used to be found only once the run had trained (or, for --lr, as AdamW's
# traceback on one rank, which its teacher then blamed on the student). FILE: a file that exists.
BAD_BEFORE_TRAINING = [
    (["--lr", -1], "--lr -1: the students' step size must be a number above 0, e.g. --lr 0.01"),
    (["--lr", 0], "--lr 0: the students' step size must be a number above 0"),
    (["--out", "FILE"], "--out FILE is a file: --out names the folder the figures go to"),
    (["--save", "/nonexistent/dir/s.pt"], "--save /nonexistent/dir/s.pt: there is no folder"),
    (["--save", "."], "--save . is a folder: give the file to write, e.g. student.pt"),
    (["--bench", "--save", "s.pt"], "--save is for training runs: --bench trains a fresh"),
]


@pytest.mark.parametrize("flags, message", BAD_BEFORE_TRAINING)
def test_bad_paths_and_step_sizes_are_named_before_training(
    capsys, monkeypatch, tmp_path, flags, message
):
    taken = tmp_path / "taken.txt"
    taken.write_text("not a folder")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit) as exit_:
        validate(parse_args([str(taken) if f == "FILE" else str(f) for f in flags]), 2)
    out = capsys.readouterr().out
    assert exit_.value.code == 2 and "Traceback" not in out, out
    assert out.startswith(f"[rank 1] error: {message.replace('FILE', str(taken))}"), out


@pytest.mark.parametrize(
    "nproc, flags, message",
    [
        (4, ["--ratio", "1:2"], "--ratio 1:2 needs a multiple of 3 ranks"),
        (2, ["--topk", 300], "--topk 300 must be between 1 and --vocab 256"),
        (2, ["--lr", -1], "--lr -1: the students' step size must be a number above 0"),
        (2, ["--save", "/nonexistent/dir/s.pt"], "--save /nonexistent/dir/s.pt: there is no"),
    ],
)
def test_bad_flags_stop_every_rank_before_any_collective(nproc, flags, message):
    result = demo(nproc, flags, timeout=60)
    out = text(result)
    assert result.returncode != 0 and "Traceback" not in out, out
    for rank in range(nproc):
        assert f"[rank {rank}] error: {message}" in out, out
    assert "teachers:students" not in out  # no rank got as far as printing the mapping


def dying_teacher(tmp_path, rank, at_step, how):
    """distill_demo, except that teacher `rank` dies instead of answering step `at_step`.
    Test-only: the package has no such switch; this wrapper replaces teacher_message."""
    wrapper = tmp_path / "dying_teacher.py"
    wrapper.write_text(
        textwrap.dedent(f"""
        import os, signal
        import distill_demo.train
        from distill_demo.__main__ import main
        real, answers = distill_demo.train.teacher_message, []

        def teacher_message(*args, **kwargs):
            answers.append(1)
            if os.environ["RANK"] == "{rank}" and len(answers) == {at_step}:
                {how}
            return real(*args, **kwargs)

        distill_demo.train.teacher_message = teacher_message
        main()
    """)
    )
    return wrapper


def test_a_teacher_that_exits_mid_run_is_named_by_its_students(tmp_path):
    """Teacher 3 serves students 0, 1, 2 (1:3) and leaves with exit code 0 at step 5, so torchrun
    does not stop the run: the students must notice by themselves, name it, and fail."""
    wrapper = dying_teacher(tmp_path, 3, 5, "os._exit(0)")
    result = run_ranks(
        wrapper,
        4,
        ["--ratio", "1:3", "--steps", 50, "--teacher-steps", 0, "--out", tmp_path],
        timeout=120,
        env={**ENV, "COURSE_TIMEOUT": "60"},
    )
    out = text(result)
    assert not result.timed_out and result.returncode != 0, out
    # The kernel closes a dead process's sockets: gloo reads "Connection closed by peer", or
    # "Connection reset by peer" if the dead process had unread data.
    assert re.search(
        r"\[rank [012]\] error: teacher rank 3 stopped answering \([^)]*Connection "
        r"(closed|reset) by peer[^)]*\) at step 5\n",
        out + "\n",
    ), out
    assert "Timed out" not in out and "checked:" not in out


def test_a_teacher_killed_mid_run_stops_the_run(tmp_path):
    wrapper = dying_teacher(tmp_path, 1, 3, "os.kill(os.getpid(), signal.SIGKILL)")
    result = run_ranks(
        wrapper,
        2,
        ["--steps", 50, "--teacher-steps", 0, "--out", tmp_path],
        timeout=120,
        env={**ENV, "COURSE_TIMEOUT": "60"},
    )
    out = text(result)
    assert not result.timed_out and result.returncode != 0, out
    assert "launcher: rank 1 failed first (exit code -9)" in out, out


def slow_teacher(tmp_path, seconds):
    """distill_demo, except that the first teacher's pretraining first sleeps `seconds` (as if
    it loaded a big checkpoint). Test-only, as dying_teacher."""
    wrapper = tmp_path / "slow_teacher.py"
    wrapper.write_text(
        textwrap.dedent(f"""
        import time
        import distill_demo.train
        from distill_demo.__main__ import main
        real = distill_demo.train.pretrain

        def pretrain(*args, **kwargs):
            time.sleep({seconds})
            return real(*args, **kwargs)

        distill_demo.train.pretrain = pretrain
        main()
    """)
    )
    return wrapper


def test_a_teacher_preparing_for_longer_than_the_timeout_is_waited_for(tmp_path):
    """Startup is not liveness: the other ranks wait for the first teacher's model without
    --timeout (3 s here; it prepares for 7), and say so once --timeout has passed."""
    result = run_ranks(
        slow_teacher(tmp_path, 7),
        2,
        ["--steps", 3, "--teacher-steps", 3, "--out", tmp_path],
        timeout=120,
        env={**ENV, "COURSE_TIMEOUT": "3"},
    )
    out = text(result)
    assert result.returncode == 0 and "Traceback" not in out, out
    assert re.search(
        r"\[rank 0\] teacher rank 1 still preparing its model after \d+ s \(--timeout 3\); "
        r"waiting, as that is not a fault",
        out,
    ), out
    assert "[rank 0] checked: losses and weights match one process" in out


def test_plain_python_starts_its_ranks_itself(tmp_path):
    result = launcher.run_command(
        [
            sys.executable,
            "-m",
            "distill_demo",
            "--nproc",
            "2",
            "--steps",
            "2",
            "--teacher-steps",
            "0",
            "--out",
            str(tmp_path),
        ],
        timeout=180,
        env={**ENV, "COURSE_BACKEND": "gloo"},
        cwd=ROOT,
    )
    assert result.returncode == 0 and result.leftovers == 0, text(result)
    assert "[rank 0] checked: each teacher answered 2 steps" in text(result)


def test_models_data_and_losses_import_and_agree():
    data = MarkovData(vocab=64, seq=16)
    ids = data.batch(step=3, shard=1, size=4)
    assert ids.shape == (4, 16) and ids.dtype == torch.int64
    assert torch.equal(ids, MarkovData(64, 16).batch(3, 1, 4))  # reproducible
    assert not torch.equal(ids, data.batch(3, 2, 4))  # each shard its own
    teacher, student = make_teacher("tiny", 64, 16), make_student("tiny", 64, 16)
    size = lambda model: sum(p.numel() for p in model.parameters())  # noqa: E731
    assert size(teacher) > size(student)
    logits = student(ids)
    (probs,) = teacher_message("full", teacher, ids, 64)
    values, indices = teacher_message("topk", teacher, ids, 64)  # k = vocab: nothing dropped
    (hidden,) = teacher_message("hidden", teacher, ids, 64)
    assert indices.dtype == torch.int32
    torch.testing.assert_close(kl_topk(logits, values, indices), kl_full(logits, probs))
    torch.testing.assert_close(teacher.lm_head(hidden).softmax(-1), probs)
    values8, indices8 = teacher_message("topk", teacher, ids, 8)
    assert kl_topk(logits, values8, indices8) >= 0
    # The teacher against its own top 8: p_i = q_i / M (M: their mass), so the loss is -log M.
    mass = probs.topk(8).values.sum(-1)
    with torch.no_grad():
        torch.testing.assert_close(kl_topk(teacher(ids), values8, indices8), -mass.log().mean())


def test_progress_is_a_line_per_tenth_off_a_terminal_and_redraws_on_one(capsys, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    bar = Progress(20, "train")
    for step in range(1, 21):
        bar.update(step, loss=1.0 / step)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "[rank 0] train 2/20 loss 0.5" and len(lines) == 10

    class Terminal:
        writes = []

        def isatty(self):
            return True

        def write(self, s):
            self.writes.append(s)

        def flush(self):
            pass

    term = Terminal()
    bar = Progress(4, "train", stream=term)
    for step in range(1, 5):
        bar.update(step, loss=0.25)
    redraws = [w for w in term.writes if w.startswith("\r")]
    assert len(redraws) == 4
    assert redraws[0].startswith("\r[rank 0] train [#####...............] 1/4")
    assert term.writes[-1] == "\n" and "\n" not in "".join(redraws)


@pytest.mark.parametrize("size", ["tiny", "small"])
def test_teacher_pretraining_learns(size):
    """Each size's recipe (train.RECIPES) must teach the teacher something in its default steps:
    at "small", the old learning rate of 1e-2 left the loss at 93% of where it started. ("large"
    is for GPUs: docs/distill_demo.md quotes its run.)"""
    steps = RECIPES[size].teacher_steps
    losses = pretrain(make_teacher(size, 256, 32), MarkovData(256, 32), size, steps, 8, "cpu")
    assert len(losses) == steps and losses[-1] < 0.6 * losses[0], (
        f"{size}: next-token loss {losses[0]:.2f} -> {losses[-1]:.2f} in {steps} steps; "
        "expected below 60% of the first"
    )


def test_a_loss_that_does_not_fall_is_one_line_with_what_to_try(capsys):
    args = parse_args(["--size", "large", "--steps", "24"])
    with pytest.raises(
        CheckFailed,
        match=r"^the students' mean loss did not fall in 24 steps: "
        r"3\.7955 -> 4\.0608\. Their step size may be too large for --size large: "
        r"try a smaller --lr than 0\.0003, or more --steps$",
    ):
        check_loss_fell([3.7955, 7.8, 4.0608], args)
    check_loss_fell([3.7955, 3.5], args)
    assert (
        "checked: mean student loss fell from 3.7955 to 3.5000 in 24 steps"
        in capsys.readouterr().out
    )
