"""A wrong answer to exercise 12.1 that skips its point: the seed's polling. The state and the
rules are right (steps share, a commit excludes, a waiting commit keeps new steps out), but
every wait is a 10 ms nap and a look. The check must say it waits on a timer."""

NAP_S = 0.01


def step_begin(lock):
    while True:
        with lock.cond:
            if not lock.committing and not lock.waiting:
                lock.steps += 1
                return
        time.sleep(NAP_S)


def step_end(lock):
    with lock.cond:
        lock.steps -= 1


def commit_begin(lock):
    with lock.cond:
        lock.waiting += 1
    while True:
        with lock.cond:
            if not lock.committing and lock.steps == 0:
                lock.waiting -= 1
                lock.committing = True
                return
        time.sleep(NAP_S)


def commit_end(lock):
    with lock.cond:
        lock.committing = False
