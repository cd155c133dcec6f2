"""A wrong answer to exercise 12.1: a waiting commit keeps new steps out, but once it holds the
lock it no longer does (step_begin forgets lock.committing): steps start while it swaps the
weights. The check must say a step ran inside a commit."""


# --8<-- [start:ex-12-1]
def step_begin(lock):
    """Exercise 12.1 (1 of 4): a generation step enters: wait while a commit holds the lock or
    waits for it (lock.committing, lock.waiting), then count the step in (lock.steps). Every
    wait is lock.cond.wait_for(...) under `with lock.cond:`, never a sleep."""
    # YOUR CODE BELOW
    with lock.cond:
        # waits while a commit waits, but not while it holds the lock: steps start mid-swap
        lock.cond.wait_for(lambda: not lock.waiting)
        lock.steps += 1


def step_end(lock):
    """Exercise 12.1 (2 of 4): a step leaves; the last one out wakes a waiting commit."""
    # YOUR CODE BELOW
    with lock.cond:
        lock.steps -= 1
        if lock.steps == 0:  # the last step out: a commit may be waiting for exactly this
            lock.cond.notify_all()


def commit_begin(lock):
    """Exercise 12.1 (3 of 4): the commit asks: say so at once (lock.waiting, which keeps new
    steps out), wait until no step runs and no other commit holds the lock, then hold it."""
    # YOUR CODE BELOW
    with lock.cond:
        lock.waiting += 1  # at once: from here no new step starts (writer preference)
        lock.cond.wait_for(lambda: not lock.committing and lock.steps == 0)
        lock.waiting -= 1
        lock.committing = True


def commit_end(lock):
    """Exercise 12.1 (4 of 4): the commit is done: let go and wake the steps held back."""
    # YOUR CODE BELOW
    with lock.cond:
        lock.committing = False
        lock.cond.notify_all()  # every step held back, and any other commit
    # --8<-- [end:ex-12-1]
