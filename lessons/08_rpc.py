"""Lesson 08 - TorchRPC: a student calls its teacher, in another process, for logits.

The idea
    Roles in different worlds (lesson 07) cannot run a collective together: they call each
    other. torch.distributed.rpc joins processes into an RPC world with its own rendezvous, next
    to and independent of any process group. rpc_sync(to, fn, args) runs fn on `to` and waits;
    rpc_async returns a Future at once (ask the teacher, compute the student's part, then wait);
    remote(to, cls) builds an object on `to` and returns an RRef to call it through. The first
    half of the ranks are students, the second half teachers; student i asks teacher i.

Run it
    torchrun --nproc-per-node 4 lessons/08_rpc.py
    python lessons/08_rpc.py --nproc 2                # plain python: starts torchrun for you
    torchrun --nproc-per-node 4 lessons/08_rpc.py --teacher hangs --rpc-timeout 3  # dies, absent

Security: RPC runs the pickled functions it is sent, so anyone who reaches its ports runs code as
    you. Here it listens on --rpc-iface lo, meets at --rpc-host 127.0.0.1; firewall rank 0's store
    (every interface). In maintenance mode; production uses Ray actors or ZMQ/HTTP + NCCL.

What you should see (4 ranks, no GPU; timings are yours)
    [rank 0] no GPU: using gloo on CPU
    [rank 0] checked: rpc_sync(teacher0, os.getpid) ran in teacher0's process
    [rank 0] checked: 6 steps through an RRef give one process's losses: 714 ms
    [rank 0] checked: rpc_async, the student's forward in between, same losses: 509 ms,
             205 ms ... than rpc_sync: ...   <- "less ...: overlapped"; MORE on busy cores
    [rank 0] checked: the students' own group, next to RPC, sums their last losses: 0.0817
    [rank 0] Next: exercise 08.1 (train_prefetching above). Check: python -m lessons.check 08
Rank setup comes from course/ranks.py (lesson 00 writes it out); RPC is this lesson.
"""

import os
import socket
import threading
import time
import warnings

import torch
import torch.distributed as dist
import torch.distributed.rpc as rpc

from course.ranks import EVEN, parser, print0, print_rank, setup, usage_error

NEEDS = EVEN  # half students, half teachers: student i asks teacher i
SEED = 0  # teacher and student weights, and each student's batches, come from it
DIM, HIDDEN, STUDENT_HIDDEN, CLASSES = 256, 1024, 1024, 32  # teacher: 4.5x the student
BATCH, STEPS, LR = 128, 6, 0.5  # each student's run: STEPS batches of BATCH; SGD's step size
SHUTDOWN_TIMEOUT_S = 30  # rpc.shutdown(graceful) waits this long for the others at most
RPC_FAILED = ("RPCErr", "tensorpipe", "On WorkerInfo")  # in RPC's own failures' messages
CLOSE = {"rtol": 1e-5, "atol": 1e-8}  # losses from different devices may differ in the last bits
RNG = threading.Lock()  # a teacher built by an RPC thread, a student by the main one: in turn


def mlp(seed, *widths):
    """Linear layers of these widths with ReLU between; the same seed gives the same weights."""
    with RNG:  # the global RNG, seeded and drawn from by one thread at a time
        torch.manual_seed(seed)
        layers = [torch.nn.Linear(a, b) for a, b in zip(widths, widths[1:])]
    return [m for layer in layers for m in (layer, torch.nn.ReLU())][:-1]


def new_student():
    """The student, smaller than its teacher, and its optimizer; on the CPU, like the logits."""
    student = torch.nn.Sequential(*mlp(SEED + 1, DIM, STUDENT_HIDDEN, CLASSES))
    return student, torch.optim.SGD(student.parameters(), lr=LR)


def make_batches(index):  # student `index`'s batches
    generator = torch.Generator().manual_seed(SEED + 1000 * (index + 1))
    return [torch.randn(BATCH, DIM, generator=generator) for _ in range(STEPS)]


# --8<-- [start:teacher]
class Teacher:
    """Lives in the teacher's process: students build it there with rpc.remote and call it
    through the RRef they get back. hang_s and die make it misbehave (--teacher hangs|dies)."""

    def __init__(self, device, hang_s=0.0, die=False):
        self.net = torch.nn.Sequential(*mlp(SEED, DIM, HIDDEN, HIDDEN, CLASSES)).to(device)
        self.device, self.hang_s, self.die = torch.device(device), hang_s, die

    def forward(self, batch):  # runs on one of the teacher's RPC threads
        if self.die:
            os._exit(1)  # at once, no goodbye: as if the machine went away
        time.sleep(self.hang_s)  # a teacher slower than the students' RPC timeout
        with torch.no_grad():  # CPU tensors in and out: RRef calls don't take CUDA tensors
            return self.net(batch.to(self.device)).cpu()
        # --8<-- [end:teacher]


def distill_step(student, optimizer, batch, teacher_logits):
    """One SGD step of the student towards the teacher's logits (mean squared error); the loss."""
    loss = torch.nn.functional.mse_loss(student(batch), teacher_logits)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item()


def reference_losses(index, device):
    """Student `index`'s losses, single-process: both models here (the teacher on `device`)."""
    (student, optimizer), teacher = new_student(), Teacher(device)
    return [distill_step(student, optimizer, b, teacher.forward(b)) for b in make_batches(index)]


# --8<-- [start:init]
def start_rpc(name, rank, world_size, address, iface, timeout_s):
    """Join the RPC world as `name`: its own rendezvous at tcp://address (rank 0 hosts it),
    apart from any process group. Joining, and every call after it, fails after timeout_s."""
    # TensorPipe (RPC's transport) and init_rpc's own gloo group listen on this interface, not
    # the hostname's (it may face a network); under torchrun rank 0 must host the store (lesson 00).
    os.environ.update(TP_SOCKET_IFNAME=iface, GLOO_SOCKET_IFNAME=iface)
    os.environ["TORCHELASTIC_USE_AGENT_STORE"] = "False"
    options = rpc.TensorPipeRpcBackendOptions(init_method=f"tcp://{address}", rpc_timeout=timeout_s)

    def give_up():  # init_rpc itself waits for a missing worker without limit
        print_rank(
            f"error: {name}: not all {world_size} RPC workers joined tcp://{address} "
            f"within {timeout_s:g} s (--rpc-timeout): is every role running?"
        )
        os._exit(1)  # this thread cannot interrupt init_rpc; end the process instead of hanging

    watchdog = threading.Timer(timeout_s, give_up)
    watchdog.start()
    try:
        with warnings.catch_warnings():  # init_rpc's own c10d warning: not ours to fix
            warnings.filterwarnings("ignore", "You are using a Backend", UserWarning)
            rpc.init_rpc(name, rank=rank, world_size=world_size, rpc_backend_options=options)
    finally:
        watchdog.cancel()


def rpc_port(requested):
    """Rank 0's free port, or the requested one, for every rank. Each rank tries it on its own
    machine first: a port in use is an error on every rank, before anyone starts RPC."""
    try:
        with socket.create_server(("", requested)) as s:  # every interface, as the store binds
            port = [s.getsockname()[1]]
    except OSError as err:
        usage_error(
            f"--rpc-port {requested}: that port is in use on this machine ({err}). "
            "Pick another, or leave --rpc-port out to get a free one."
        )
    dist.broadcast_object_list(port, src=0)
    return port[0]
    # --8<-- [end:init]


# --8<-- [start:calls]
def train_sync(student, optimizer, teacher, batches):
    """One distillation step per batch; the student waits for the teacher, then computes."""
    losses = []
    for batch in batches:
        teacher_logits = teacher.rpc_sync().forward(batch)  # runs Teacher.forward on its owner
        losses.append(distill_step(student, optimizer, batch, teacher_logits))
    return losses


def train_async(student, optimizer, teacher, batches):
    """The same steps; the teacher computes while the student runs its own forward."""
    losses = []
    for batch in batches:
        future = teacher.rpc_async().forward(batch)  # returns at once: the teacher starts...
        logits = student(batch)  # ...and the student computes meanwhile
        loss = torch.nn.functional.mse_loss(logits, future.wait())  # waits only here
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses
    # --8<-- [end:calls]


# --8<-- [start:ex-08-1]
def train_prefetching(student, optimizer, teacher, batches):
    """Exercise 08.1: the same steps and losses as train_sync, but the teacher works while the
    student trains: before the step on batch i, ask (rpc_async) for batch i+1's logits, so
    the answer is ready when the step is done. Returns the list of losses, one per batch."""
    # YOUR CODE BELOW
    raise NotImplementedError("Exercise 08.1: ask one batch ahead with rpc_async (about 7 lines)")
    # --8<-- [end:ex-08-1]


def student_work(ctx, args, me, teacher_name, teacher_info, students, student_group):
    """Everything student `me` does over RPC, checked against single-process answers."""
    pid = rpc.rpc_sync(teacher_name, os.getpid)  # a function, run on the teacher
    assert pid == teacher_info["pid"], f"rank {ctx.rank}: {teacher_name} said pid {pid}"
    print0(f"checked: rpc_sync({teacher_name}, os.getpid) ran in {teacher_name}'s process")
    misbehave = (3 * args.rpc_timeout if args.teacher == "hangs" else 0, args.teacher == "dies")
    # A Teacher built there, on the teacher's device; we hold an RRef to it.
    teacher = rpc.remote(teacher_name, Teacher, (teacher_info["device"], *misbehave))
    teacher.rpc_sync().forward(make_batches(ctx.rank)[0])  # waits for it to be built: not timed
    runs = []
    for train in train_sync, train_async:  # the same steps, each from a new student, timed
        student, batches = new_student(), make_batches(ctx.rank)
        start = time.perf_counter()
        runs.append((train(*student, teacher, batches), 1000 * (time.perf_counter() - start)))
    (losses, sync_ms), (overlapped, async_ms) = runs
    torch.testing.assert_close(losses, reference_losses(ctx.rank, ctx.device), **CLOSE)
    print0(f"checked: {STEPS} steps through an RRef give one process's losses: {sync_ms:.0f} ms")
    torch.testing.assert_close(overlapped, losses, **CLOSE)
    than = ("MORE", "too few free cores") if async_ms >= sync_ms else ("less", "overlapped")
    than = f"{async_ms:.0f} ms, {abs(async_ms - sync_ms):.0f} ms {than[0]} than rpc_sync: {than[1]}"
    print0(f"checked: rpc_async, the student's forward in between, same losses: {than}")
    total = torch.tensor([losses[-1]], device=ctx.device)
    dist.all_reduce(total, group=student_group)  # the students' own group, next to RPC
    expected = sum(reference_losses(s, ctx.device)[-1] for s in students)
    torch.testing.assert_close(total.item(), expected, **CLOSE)
    print0(f"checked: the students' own group, next to RPC, sums their last losses: {expected:.4f}")


def main():
    p = parser(__doc__)
    p.add_argument("--rpc-host", default="127.0.0.1", help="where RPC meets: rank 0's address")
    p.add_argument("--rpc-iface", default="lo", help="the interface RPC listens on (trusted!)")
    p.add_argument("--rpc-port", type=int, default=0, help="rank 0's rendezvous port (0: free)")
    p.add_argument("--rpc-timeout", type=float, default=10.0, help="seconds an RPC may take (10)")
    p.add_argument("--teacher", default="answers", choices=["answers", "hangs", "dies", "absent"])
    args = p.parse_args()
    with setup(args, NEEDS, relaunch=True, trace=args.trace) as ctx:
        students = list(range(ctx.world_size // 2))
        student_group = dist.new_group(students, timeout=ctx.timeout)  # every rank makes it
        names = [f"student{r}" for r in students] + [f"teacher{r}" for r in students]
        me, partner = names[ctx.rank], (ctx.rank + len(students)) % ctx.world_size
        peers = [None] * ctx.world_size  # a directory, through the process group: pid, device
        dist.all_gather_object(peers, {"pid": os.getpid(), "device": str(ctx.device)})
        address = f"{args.rpc_host}:{rpc_port(args.rpc_port)}"
        if args.teacher == "absent" and ctx.rank not in students:
            time.sleep(3 * args.rpc_timeout)  # never joins: the students give up, torchrun ends us
            return
        start_rpc(me, ctx.rank, ctx.world_size, address, args.rpc_iface, args.rpc_timeout)
        try:
            if ctx.rank in students:
                student_work(ctx, args, me, names[partner], peers[partner], students, student_group)
            # Teachers serve from RPC threads until every worker has called a graceful shutdown.
            rpc.shutdown(graceful=True, timeout=SHUTDOWN_TIMEOUT_S)
        except RuntimeError as err:  # how RPC failures, and a rank that left, reach this rank
            failed = any(marker in str(err) for marker in RPC_FAILED)  # a timeout, a lost peer
            if not failed and "Connection closed" not in str(err):
                raise
            why = "another rank left the run before it was done"
            if failed:
                why = f"its teacher {names[partner]} (rank {partner}) did not answer"
            said = str(err).strip().splitlines()[0]
            print_rank(f"error: {me}: {why} (--rpc-timeout {args.rpc_timeout:g} s): {said}")
            os._exit(1)  # now: RPC's and NCCL's teardown would wait on the teacher that failed us
        print0("Next: exercise 08.1 (train_prefetching above). Check: python -m lessons.check 08")


if __name__ == "__main__":
    main()
