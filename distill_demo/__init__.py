"""distill_demo: lesson 06's teacher-student distillation grown into a small trainer.

    torchrun --nproc-per-node 4 -m distill_demo [--ratio 1:3] [--transfer full|topk|hidden]
    torchrun --nproc-per-node 2 -m distill_demo --bench

Run `python -m distill_demo --help` for every flag; docs/distill_demo.md explains the design.

Files (each one job; communication apart from training logic):
    models.py     TinyTransformer, make_teacher / make_student: importable on their own
    data.py       MarkovData: seeded synthetic token sequences, nothing downloaded
    knowledge.py  what a teacher sends in each transfer mode, and the losses (kl_full, kl_topk)
    comms.py      Layout (who teaches whom), groups, the message protocol, P2PTeachers,
                  gradient averaging
    startup.py    the wait for the teacher that prepares the model: not bounded by --timeout,
                  yet not for a dead teacher
    train.py      Config; a student's step, its teachers behind an interface (Teachers);
                  a teacher's loop
    reference.py  one process doing what all the students do, to compare with
    bench.py      --bench: every transfer mode, overlap on and off, one table
    report.py     progress bar, timeline recording, figures
    __main__.py   flags, their checks, setup, the training run's report

Other code (rpc_demo) reuses the models, the data and the losses, and the step itself:

    from distill_demo.models import make_teacher, make_student
    from distill_demo.data import MarkovData
    from distill_demo.knowledge import kl_full, kl_topk, teacher_message
    from distill_demo.train import Config, train_student   # with teachers of its own

Importing the package imports none of its modules, so those imports cost only what they use.
"""
