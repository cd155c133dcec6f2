"""An answer to lesson 08's exercise that gets the right losses but skips what the exercise
teaches: each check must catch it and say why (tests/test_checks_catch.py). Every request
leaves one batch ahead, so counting when requests leave is not enough: the check must also
note when each answer is waited for."""


def train_prefetching(student, optimizer, teacher, batches):
    # Skips the point: asks for batch i+1 before the step on batch i, as asked, but waits for
    # that answer at once, before the step: synchronous in disguise, the teacher never works
    # while the student trains.
    losses = []
    next_logits = teacher.rpc_async().forward(batches[0]).wait()
    for i, batch in enumerate(batches):
        logits = next_logits
        if i + 1 < len(batches):
            next_logits = teacher.rpc_async().forward(batches[i + 1]).wait()  # waits right here
        losses.append(distill_step(student, optimizer, batch, logits))
    return losses
