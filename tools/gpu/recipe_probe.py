"""Which learning rates let each size learn: the numbers behind distill_demo.train.RECIPES.

    PYTHONPATH=. python3 tools/gpu/recipe_probe.py teacher large 32768 1024 4 200 1e-3,3e-4 10
    PYTHONPATH=. python3 tools/gpu/recipe_probe.py student large 32768 1024 4 60 1e-2,1e-3 full

`teacher`: next-token pretraining from scratch at each learning rate (the last argument: linear
warm-up steps). `student`: the size's teacher is pretrained once with its recipe, then a fresh
student distils from it (what the teacher sends: full, topk or hidden; top-k with k = 64) at
each learning rate, as rpc_demo's single-process reference does. Prints the loss along the way.
"""

import sys
import time

import torch

from distill_demo.data import MarkovData
from distill_demo.knowledge import student_loss, teacher_message
from distill_demo.models import make_student, make_teacher
from distill_demo.train import RECIPES, pretrain

TOPK = 64


def curve(losses):
    every = max(1, len(losses) // 6)
    marks = [*range(0, len(losses), every), len(losses) - 1]
    return " ".join(f"{step}:{losses[step]:.2f}" for step in marks)


def main():
    part, size, vocab, seq, batch, steps = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:7])
    lrs, extra = [float(x) for x in sys.argv[7].split(",")], sys.argv[8]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = MarkovData(vocab, seq)
    where = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(
        f"{part} {size}: vocab {vocab} seq {seq} batch {batch} steps {steps} {extra}; the "
        f"data's entropy {data.entropy():.2f}; {where}",
        flush=True,
    )
    if part == "student":
        start = time.perf_counter()
        teacher = make_teacher(size, vocab, seq).to(device)
        losses = pretrain(teacher, data, size, RECIPES[size].teacher_steps, batch, device)
        print(
            f"teacher: {RECIPES[size].teacher_steps} steps, {losses[0]:.2f} -> {losses[-1]:.2f} "
            f"({time.perf_counter() - start:.1f} s)",
            flush=True,
        )
        teacher = teacher.to(torch.bfloat16 if device.type == "cuda" else torch.float32).eval()
        batches = [data.batch(step, 0, batch).to(device) for step in range(steps)]
        for lr in lrs:
            student = make_student(size, vocab, seq).to(device)
            optimizer = torch.optim.AdamW(student.parameters(), lr=lr)
            losses = []
            for ids in batches:
                message = teacher_message(extra, teacher, ids, TOPK)
                with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
                    loss = student_loss(extra, student(ids), message, teacher.lm_head.weight)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                losses.append(loss.item())
            print(f"student lr {lr:g}: {curve(losses)}", flush=True)
        return
    warmup = int(extra)
    for lr in lrs:
        start = time.perf_counter()
        losses = pretrain(
            make_teacher(size, vocab, seq).to(device),
            data,
            size,
            steps,
            batch,
            device,
            lr=lr,
            warmup=warmup,
        )
        print(
            f"teacher lr {lr:g} warm-up {warmup}: {curve(losses)} "
            f"({time.perf_counter() - start:.1f} s)",
            flush=True,
        )


if __name__ == "__main__":
    main()
