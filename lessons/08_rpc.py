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

Security: RPC runs the pickled functions it is sent, so anyone who reaches its ports runs code
    as you: trusted networks only. This lesson meets at --rpc-host 127.0.0.1 and listens on
    --rpc-iface lo. Across machines of a trusted network: --rpc-host <rank 0's address>
    --rpc-iface <the interface facing it>. Rank 0's store listens on all interfaces: firewall it.
Maintenance mode: "APIs in the RPC package are stable and in maintenance mode" (PyTorch docs).
    Production systems use Ray actors, or ZMQ/HTTP control planes with NCCL moving the tensors.

What you should see (4 ranks, no GPU; timings are yours)
    [rank 0] checked: rpc_sync(teacher0, os.getpid) ran in teacher0's process (the pid it ...
    [rank 0] checked: 6 distillation steps through an RRef to teacher0 give the losses of one ...
    [rank 0] checked: rpc_async, with the student's forward in between, gives the same losses
    [rank 0] device_maps: skipped (gloo on CPU). ...
    [rank 0] student0: rpc_async returned in 0.52 ms; when the student's forward was done, ...
Rank setup comes from course/ranks.py (lesson 00 writes it out); RPC is this lesson.
"""
import importlib
import math
import os
import signal
import socket
import statistics
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
BATCH, STEPS = 128, 6  # each student's distillation run: STEPS batches of BATCH
TEMPERATURE, LR = 2.0, 0.5  # softened distributions for the loss; SGD's learning rate
SHUTDOWN_TIMEOUT_S = 30  # rpc.shutdown(graceful) waits this long for the others at most
# In the messages of RPC's own failures: a timeout, a broken connection, the callee raised.
RPC_FAILED = ("RPCErr", "tensorpipe", "On WorkerInfo")


def importable(obj):
    """RPC sends functions and classes by module and name; the callee imports them. This file
    runs as __main__ under torchrun and under another name in exercise checks: the name that
    imports anywhere is lessons.08_rpc (importlib allows the leading digit)."""
    return getattr(importlib.import_module("lessons.08_rpc"), obj.__name__)


def mlp(seed, *widths):
    """Linear layers of these widths, ReLU between, weights from a generator of their own: two
    threads building models at once (a teacher built by an RPC thread, a student by the main
    one) would race on the global RNG."""
    generator, layers = torch.Generator().manual_seed(seed), []
    for fan_in, fan_out in zip(widths, widths[1:]):
        layers += [torch.nn.Linear(fan_in, fan_out), torch.nn.ReLU()]
        bound = 1 / math.sqrt(fan_in)  # the range torch's own Linear init draws from
        with torch.no_grad():
            layers[-2].weight.uniform_(-bound, bound, generator=generator)
            layers[-2].bias.uniform_(-bound, bound, generator=generator)
    return layers[:-1]


def teacher_net():
    return torch.nn.Sequential(*mlp(SEED, DIM, HIDDEN, HIDDEN, CLASSES))


class Student(torch.nn.Sequential):
    """The student: smaller than its teacher; takes batches from the CPU, wherever it lives."""
    def forward(self, batch):
        return super().forward(batch.to(self[0].weight.device))


def new_student(device):
    student = Student(*mlp(SEED + 1, DIM, STUDENT_HIDDEN, CLASSES)).to(device)
    return student, torch.optim.SGD(student.parameters(), lr=LR)


def make_batches(student_index, steps=STEPS):
    generator = torch.Generator().manual_seed(SEED + 1000 * (student_index + 1))
    return [torch.randn(BATCH, DIM, generator=generator) for _ in range(steps)]


# --8<-- [start:teacher]
class Teacher:
    """Lives in the teacher's process: students build it there with rpc.remote and call it
    through the RRef they get back. hang_s and die make it misbehave (--teacher hangs|dies)."""
    def __init__(self, device, hang_s=0.0, die=False):
        self.net, self.device = teacher_net().to(device).eval(), torch.device(device)
        self.hang_s, self.die = hang_s, die

    def forward(self, batch):  # runs on one of the teacher's RPC threads
        if self.die:
            os.kill(os.getpid(), signal.SIGKILL)  # as if the machine went away
        time.sleep(self.hang_s)  # a teacher slower than the students' RPC timeout
        with torch.no_grad():  # CPU tensors in and out: RRef calls don't take CUDA tensors
            return self.net(batch.to(self.device)).cpu()
# --8<-- [end:teacher]


def kd_loss(student_logits, teacher_logits):
    """Distillation loss: KL(teacher || student) of the temperature-softened distributions."""
    teacher_logits = teacher_logits.to(student_logits.device)
    return torch.nn.functional.kl_div(
        torch.log_softmax(student_logits / TEMPERATURE, dim=-1),
        torch.log_softmax(teacher_logits / TEMPERATURE, dim=-1),
        log_target=True, reduction="batchmean") * TEMPERATURE ** 2


def distill_step(student, optimizer, batch, teacher_logits):
    """One SGD step of the student towards the teacher's logits for `batch`; returns the loss."""
    loss = kd_loss(student(batch), teacher_logits)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item()


def reference_losses(student_index, device):
    """The single-process answer: both models in this process, no RPC."""
    student, optimizer = new_student(device)
    teacher = teacher_net().to(device).requires_grad_(False)
    return [distill_step(student, optimizer, b, teacher(b.to(device)))
            for b in make_batches(student_index)]


# --8<-- [start:init]
def start_rpc(name, rank, world_size, host, port, iface, timeout_s, device_maps=None):
    """Join the RPC world as `name`: its own rendezvous on tcp://host:port (rank 0 hosts it),
    apart from any process group. Joining, and every call after it, fails after timeout_s."""
    # TensorPipe (RPC's transport) and the gloo group init_rpc builds inside listen on the
    # address of this interface, instead of the one the hostname resolves to, which may face
    # a network. Read once per process, at the first init_rpc.
    os.environ["TP_SOCKET_IFNAME"] = os.environ["GLOO_SOCKET_IFNAME"] = iface
    # Under torchrun, a tcp:// rendezvous looks for torchrun's store instead of hosting its own
    # (lesson 00): say that rank 0 of this world hosts it.
    os.environ["TORCHELASTIC_USE_AGENT_STORE"] = "False"
    options = rpc.TensorPipeRpcBackendOptions(
        init_method=f"tcp://{host}:{port}", rpc_timeout=timeout_s, device_maps=device_maps)

    def give_up():  # init_rpc itself waits for a missing worker without limit
        print_rank(f"error: {name}: not all {world_size} RPC workers joined tcp://{host}:{port} "
                   f"within {timeout_s:g} s (--rpc-timeout). Is every role running, and "
                   "pointed at the same address and port?")
        os._exit(1)  # this thread cannot interrupt init_rpc; end the process instead of hanging

    watchdog = threading.Timer(timeout_s, give_up)
    watchdog.start()
    try:
        with warnings.catch_warnings():
            # init_rpc's own code hands c10d a raw gloo backend where c10d wants a group, and
            # c10d warns ("You are using a Backend ... as a ProcessGroup"): not ours to fix.
            warnings.filterwarnings("ignore", "You are using a Backend", UserWarning)
            rpc.init_rpc(name, rank=rank, world_size=world_size, rpc_backend_options=options)
    finally:
        watchdog.cancel()


def rpc_port(requested):
    """Rank 0 picks a free port (or checks the requested one) and shares it with every rank;
    a port in use is an error on every rank, before anyone starts RPC."""
    answer = [None, None]
    if dist.get_rank() == 0:
        with socket.socket() as s:  # the store binds every interface: test the same
            try:
                s.bind(("", requested))
                answer[0] = s.getsockname()[1]
            except OSError as err:
                answer[1] = (f"--rpc-port {requested}: that port is in use on this machine "
                             f"({err.strerror})")
    dist.broadcast_object_list(answer, src=0)
    if answer[1]:
        usage_error(f"{answer[1]}. Pick another, or leave --rpc-port out to get a free one.")
    return answer[0]
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
        student_logits = student(batch)  # ...and the student computes meanwhile
        loss = kd_loss(student_logits, future.wait())  # wait only when the answer is needed
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses
# --8<-- [end:calls]


def double_where_it_lands(tensor):
    """Runs on the teacher: says which device the tensor arrived on, and answers on it."""
    return tensor * 2, str(tensor.device)


# --8<-- [start:ex-08-1]
def train_prefetching(student, optimizer, teacher, batches):
    """Exercise 08.1: the same steps and losses as train_sync, but the teacher works while the
    student trains: before the step on batch i, ask (rpc_async) for batch i+1's logits, so
    the answer is ready when the step is done. Returns the list of losses, one per batch.
    """
    # YOUR CODE BELOW
    raise NotImplementedError("Exercise 08.1: ask for batch 0, then in each step ask for the next "
                              "batch before training on this one (about 7 lines)")
# --8<-- [end:ex-08-1]


def check_prefetching(ctx, train_prefetching):
    """Runs on every rank. Here every rank is a student and hosts the next rank's teacher, so
    every rank has losses to compare with the single-process reference."""
    devices = [None] * ctx.world_size
    dist.all_gather_object(devices, str(ctx.device))
    start_rpc(f"worker{ctx.rank}", ctx.rank, ctx.world_size, "127.0.0.1", rpc_port(0), "lo", 30)
    try:
        owner = (ctx.rank + 1) % ctx.world_size
        teacher = rpc.remote(f"worker{owner}", importable(Teacher), args=(devices[owner],))
        yours = train_prefetching(*new_student(ctx.device), teacher, make_batches(ctx.rank))
        expected = reference_losses(ctx.rank, ctx.device)  # compared with a float tolerance:
        return {"losses": torch.tensor(yours)}, {"losses": torch.tensor(expected)}  # GPUs differ
    finally:  # every rank gets here, stub or not: the graceful shutdown is a meeting of all
        rpc.shutdown(graceful=True, timeout=SHUTDOWN_TIMEOUT_S)


# Exercise id -> (its check, the function(s) you write). Check: python -m lessons.check 08
EXERCISES = {"08.1": (check_prefetching, "train_prefetching")}


def show_timings(me, teacher_name, teacher, device):
    """Median milliseconds: asking alone, the student's forward and step alone, whole steps
    with rpc_sync and rpc_async; and one rpc_async watched: did the two sides work at once?"""
    batches = make_batches(0)
    student, optimizer = new_student(device)
    logits = teacher.rpc_sync().forward(batches[0])  # also warms up the connection

    def timed(work, batch):  # (milliseconds, what work returned)
        start = time.perf_counter()
        result = work(batch)
        return 1000 * (time.perf_counter() - start), result

    works = (lambda b: teacher.rpc_sync().forward(b),
             lambda b: student(b).sum().item(),  # .item(): wait for a GPU, too
             lambda b: distill_step(student, optimizer, b, logits),
             lambda b: train_sync(student, optimizer, teacher, [b]),
             lambda b: train_async(student, optimizer, teacher, [b]))
    ask, forward, step, sync, overlapped = [statistics.median(timed(work, b)[0] for b in batches)
                                            for work in works]
    returned, future = timed(lambda b: teacher.rpc_async().forward(b), batches[0])
    student(batches[0]).sum().item()
    answered = future.done()  # already answered when the student's forward was done?
    future.wait()
    print0(f"{me}, medians of {STEPS} steps: asking {teacher_name} {ask:.1f} ms, the "
           f"student's forward {forward:.1f} ms, its whole step {step:.1f} ms")
    print0(f"{me}: rpc_async returned in {returned:.2f} ms; when the student's forward was "
           f"done, the answer was {'in' if answered else 'not in yet'}")
    print0(f"{me}: a step with rpc_sync {sync:.1f} ms, with rpc_async {overlapped:.1f} ms: at "
           "most the forward can hide; exercise 08.1 hides the whole step")


def student_work(ctx, args, me, teacher_name, teacher_info, student_group, students):
    """Everything student `me` does over RPC, checked against single-process answers."""
    pid = rpc.rpc_sync(teacher_name, os.getpid)  # a function run on the teacher: os.getpid
    assert pid == teacher_info["pid"], f"rank {ctx.rank}: {teacher_name} said pid {pid}"
    print0(f"checked: rpc_sync({teacher_name}, os.getpid) ran in {teacher_name}'s process (the "
           "pid it reported through the process group)")
    hang_s = 3 * args.rpc_timeout if args.teacher == "hangs" else 0.0
    teacher = rpc.remote(teacher_name, importable(Teacher),  # built there; we hold an RRef
                         args=(teacher_info["device"], hang_s, args.teacher == "dies"))
    losses = train_sync(*new_student(ctx.device), teacher, make_batches(ctx.rank))
    expected = reference_losses(ctx.rank, ctx.device)
    assert all(math.isclose(a, b, rel_tol=1e-5) for a, b in zip(losses, expected)), \
        f"rank {ctx.rank}: losses over RPC {losses}, in one process {expected}"
    print0(f"checked: {STEPS} distillation steps through an RRef to {teacher_name} give the losses "
           f"of one process holding both models ({losses[0]:.4f} ... {losses[-1]:.4f})")
    overlapped = train_async(*new_student(ctx.device), teacher, make_batches(ctx.rank))
    assert all(math.isclose(a, b, rel_tol=1e-5) for a, b in zip(overlapped, losses)), \
        f"rank {ctx.rank}: rpc_async losses {overlapped}, rpc_sync {losses}"
    print0("checked: rpc_async, with the student's forward in between, gives the same losses")

    total = torch.tensor([losses[-1]], device=ctx.device)
    dist.all_reduce(total, group=student_group)  # the students' own group, next to RPC
    expected = sum(reference_losses(s, ctx.device)[-1] for s in students)
    assert math.isclose(total.item(), expected, rel_tol=1e-5), f"rank {ctx.rank}: {total.item()}"
    print0(f"checked: the students' own group sums their last losses next to RPC: "
           f"{total.item():.4f}, {len(students)} single-process runs give {expected:.4f}")

    if ctx.backend == "nccl":  # device_maps: CUDA tensors straight from this GPU to the teacher's
        x = torch.arange(4.0, device=ctx.device)
        doubled, landed = rpc.rpc_sync(teacher_name, importable(double_where_it_lands), args=(x,))
        assert landed == teacher_info["device"] and doubled.device == ctx.device, (landed, doubled)
        assert torch.equal(doubled, 2 * x), f"rank {ctx.rank}: {doubled}"
        print0(f"checked: device_maps sent {x.device} -> {landed} to {teacher_name}, and the "
               f"answer came back on {doubled.device}")
    else:
        print0("device_maps: skipped (gloo on CPU). With a GPU per rank, {teacher: {my GPU: "
               "its GPU}} lets RPC send CUDA tensors, which it refuses otherwise")

    if ctx.rank == 0:  # timed alone: the other students wait below; each side gets a core
        show_timings(me, teacher_name, teacher, ctx.device)
    dist.barrier(group=student_group)


def main():
    p = parser(__doc__)
    p.add_argument("--rpc-host", default="127.0.0.1",
                   help="where the RPC world meets: rank 0's address (127.0.0.1: this machine)")
    p.add_argument("--rpc-iface", default="lo",
                   help="the interface RPC listens on (lo: this machine; a trusted NIC otherwise)")
    p.add_argument("--rpc-port", type=int, default=0,
                   help="rank 0's rendezvous port (0: a free one)")
    p.add_argument("--rpc-timeout", type=float, default=10.0,
                   help="seconds an RPC may take before it fails, naming the teacher (10)")
    p.add_argument("--teacher", choices=["answers", "hangs", "dies", "absent"], default="answers",
                   help="make every teacher misbehave (absent: never joins RPC), to see the "
                        "students fail fast")
    args = p.parse_args()
    with setup(args, NEEDS, relaunch=True, trace=args.trace) as ctx:
        half = ctx.world_size // 2
        students, teachers = list(range(half)), list(range(half, ctx.world_size))
        # Each role's own process group, made (by every rank, in one order) before RPC starts.
        student_group, teacher_group = (dist.new_group(r, timeout=ctx.timeout)
                                        for r in (students, teachers))
        # Waiting while serving RPC takes a gloo group: on a GPU, an NCCL barrier makes the
        # device's default stream wait for the others, and the teacher's RPC threads run its
        # forward on that stream: the answer would wait for students that wait for the answer.
        everyone = dist.new_group(backend="gloo", timeout=ctx.timeout)
        names = [f"student{r}" for r in students] + [f"teacher{r - half}" for r in teachers]
        me, partner = names[ctx.rank], (ctx.rank + half) % ctx.world_size
        peers = [None] * ctx.world_size  # a directory, through the process group: pid, device
        dist.all_gather_object(peers, {"pid": os.getpid(), "device": str(ctx.device)})
        port = rpc_port(args.rpc_port)
        maps = None  # a student on a GPU maps its device to its teacher's
        if ctx.backend == "nccl" and ctx.rank in students:
            maps = {names[partner]: {ctx.device: torch.device(peers[partner]["device"])}}
        if args.teacher == "absent" and ctx.rank in teachers:
            time.sleep(3 * args.rpc_timeout)  # never joins: the students give up, torchrun ends us
            return
        start_rpc(me, ctx.rank, ctx.world_size, args.rpc_host, port, args.rpc_iface,
                  args.rpc_timeout, maps)
        done = False
        try:
            if ctx.rank in students:
                student_work(ctx, args, me, names[partner], peers[partner], student_group, students)
            else:  # a teacher's work is done by its RPC threads, answering the students
                dist.barrier(group=teacher_group)  # (its own group works next to RPC too)
            dist.barrier(group=everyone)  # every student is done asking: shut RPC down together
            done = True
        except RuntimeError as err:  # how RPC failures, and a rank that left, reach this rank
            if any(marker in str(err) for marker in RPC_FAILED):
                why = (f"its teacher {names[partner]} (rank {partner}) did not answer (a teacher "
                       f"slower than --rpc-timeout, {args.rpc_timeout:g} s, unreachable or dead "
                       "ends the run instead of hanging it)")
            elif "Connection closed" in str(err):
                why = "another rank left the run before it was done"
            else:
                raise
            print_rank(f"error: {me}: {why}: {str(err).strip().splitlines()[0]}")
            os._exit(1)  # now: RPC's and NCCL's teardown would wait on the teacher that failed us
        finally:
            rpc.shutdown(graceful=done, timeout=SHUTDOWN_TIMEOUT_S)
        print0("Next: exercise 08.1 (train_prefetching above). Check: python -m lessons.check 08")


if __name__ == "__main__":
    main()
