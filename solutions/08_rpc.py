"""Reference solutions for lessons/08_rpc.py. Check: python -m lessons.check 08 --solution

Each function runs in the lesson's namespace: torch, dist, rpc and the lesson's helpers are in
scope.
"""


# --8<-- [start:ex-08-1]
def train_prefetching(student, optimizer, teacher, batches):
    """Exercise 08.1: the same steps and losses as train_sync, but the teacher works while the
    student trains: before the step on batch i, ask (rpc_async) for batch i+1's logits, so
    the answer is ready when the step is done. Returns the list of losses, one per batch."""
    # YOUR CODE BELOW
    losses = []
    pending = teacher.rpc_async().forward(batches[0])
    for i, batch in enumerate(batches):
        teacher_logits = pending.wait()  # this batch's answer, asked for one step ago
        if i + 1 < len(batches):  # the teacher starts on the next batch...
            pending = teacher.rpc_async().forward(batches[i + 1])
        losses.append(distill_step(student, optimizer, batch, teacher_logits))  # ...as we train
    return losses
    # --8<-- [end:ex-08-1]
