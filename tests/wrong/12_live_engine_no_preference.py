"""A wrong answer to exercise 12.1: event-driven and exclusive, but without writer preference:
a step waits only while a commit holds the lock, not while one waits for it, so a stream of
steps can starve every commit. The check's scene must say the new step went first."""


def step_begin(lock):
    with lock.cond:
        lock.cond.wait_for(lambda: not lock.committing)  # forgets lock.waiting
        lock.steps += 1


def step_end(lock):
    with lock.cond:
        lock.steps -= 1
        if lock.steps == 0:
            lock.cond.notify_all()


def commit_begin(lock):
    with lock.cond:
        lock.waiting += 1
        lock.cond.wait_for(lambda: not lock.committing and lock.steps == 0)
        lock.waiting -= 1
        lock.committing = True


def commit_end(lock):
    with lock.cond:
        lock.committing = False
        lock.cond.notify_all()
