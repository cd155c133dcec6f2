"""rpc_demo: distillation over RPC. Students form a data-parallel world of their own, teachers
form another, and the students call the teachers with TorchRPC (lesson 08), pipelined so the
next request is in flight while the student computes. Models, data, losses and the training
step are distill_demo's; --bench trains the same config over p2p and over RPC in one run.

    python -m rpc_demo [--students 2 --teachers 2] [--transfer full|topk|hidden]
    python -m rpc_demo --students 1 --teachers 1 --bench

Files (each one job):
    launch.py    the launcher: checks, ports, forks the processes, watches them, stops them
    worker.py    one process's life: a training run, and rank 0's report
    worlds.py    Worker (a process's fixed facts); joining a role's world and the RPC world,
                 bounded; naming who never came
    roles.py     what a student and a teacher do between joining and leaving their worlds
    student.py   RpcTeachers: a student's teachers over RPC, for distill_demo's training step
    teacher.py   the functions students call on a teacher, and its wait for their stop
    bench.py     --bench: p2p (distill_demo's trainer) and RPC, one table
    __main__.py  flags and their checks

docs/rpc_demo.md explains the design.
"""
