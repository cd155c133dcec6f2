"""An answer to lesson 08's exercise that gets the right losses but skips what the exercise
teaches: each check must catch it and say why (tests/test_checks_catch.py)."""


def train_prefetching(student, optimizer, teacher, batches):
    # Skips the point: rpc_async, but it waits for each answer before it asks for the next one.
    # Synchronous in disguise: the teacher never works while the student trains.
    losses = []
    for batch in batches:
        future = teacher.rpc_async().forward(batch)
        losses.append(distill_step(student, optimizer, batch, future.wait()))
    return losses
