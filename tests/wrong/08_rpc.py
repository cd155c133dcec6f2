"""Plausible wrong answers to lesson 08's exercises: each check must catch them."""


def train_prefetching(student, optimizer, teacher, batches):
    # Wrong: asks for the next batch before waiting for this one, and overwrites the Future it
    # needed. It overlaps nicely, but batch i trains against the teacher's logits for batch i+1.
    losses = []
    pending = teacher.rpc_async().forward(batches[0])
    for i, batch in enumerate(batches):
        if i + 1 < len(batches):
            pending = teacher.rpc_async().forward(batches[i + 1])
        losses.append(distill_step(student, optimizer, batch, pending.wait()))
    return losses
