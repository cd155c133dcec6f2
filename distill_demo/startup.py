"""Startup is not liveness: waiting for the teacher that prepares the model, without --timeout.

The first teacher prepares the model (it pretrains here; a real run would load a checkpoint)
for as long as that takes. Everyone else waits for it: the other teachers for its weights, the
students for their first answer. If they waited in a collective or a recv, --timeout would run
out during a long preparation and they would call a busy teacher dead. So they wait on a key in
a store instead, and go on to the broadcast and the first recv (bounded by --timeout again)
only once the model is ready.

Waiting without --timeout must not mean waiting for a dead rank. The preparing rank beats: a
thread adds 1 to a counter in the store every BEAT_S. A waiter fails, naming it, within SILENT_S
if the beat stops (torchrun stops every rank sooner if one fails), and after LIMIT_S in any case.
It says after --timeout, and then every SAY_EVERY_S, that it is still waiting. rpc_demo keeps
the same state in its launcher's roll instead, where a dead process is seen at once.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator

import torch.distributed as dist

from course.ranks import print_rank
from distill_demo.comms import PeerLost

BEAT_S = 1.0  # how often the preparing rank says it is alive
SILENT_S = 20.0  # no beat this long: it is gone (a loaded laptop can stall a thread for seconds)
LIMIT_S = 3600.0  # the longest a preparation may take (pretraining, loading a checkpoint)
SAY_EVERY_S = 60.0  # after --timeout, how often a waiter says it is still waiting
POLL_S = 0.1  # how often a waiter looks (at the store, or rpc_demo's roll)


class Preparation:
    """How the others wait for the preparing rank. Where its state is kept is up to a subclass
    (StorePreparation here; rpc_demo's RollPreparation): `preparing` and `look`.
    who: how to name the preparing rank; timeout_s: --timeout, when a waiter first says it is
    waiting; say: this rank says it (one rank is enough)."""

    def __init__(self, who: str, timeout_s: float, say: bool):
        self.who, self.timeout_s, self.say = who, timeout_s, say

    def preparing(self) -> contextlib.AbstractContextManager:
        """The preparing rank, for the length of its preparation; says at its end that the
        model is ready (not if the preparation fails: the rank then ends)."""
        raise NotImplementedError

    def look(self) -> tuple[bool, int | None]:
        """(is the model ready?, a count that grows while the preparing rank lives, or None if
        its death is seen otherwise); PeerLost if it is known to be gone."""
        raise NotImplementedError

    # --8<-- [start:wait]
    def wait(self) -> None:
        """Everyone else: return once the model is ready; PeerLost naming the preparing rank if
        it is gone (or its beat stops for SILENT_S), or still preparing after LIMIT_S."""
        start = time.monotonic()
        beats, heard, say_at = -1, start, start + self.timeout_s
        while True:
            ready, now_beats = self.look()
            if ready:
                return
            now = time.monotonic()
            if now_beats != beats:
                beats, heard = now_beats, now
            if now_beats is not None and now - heard > SILENT_S:
                raise PeerLost(
                    f"{self.who} went silent while preparing its model: no beat for "
                    f"{SILENT_S:g} s (did it die?)"
                )
            if now - start > LIMIT_S:
                raise PeerLost(f"{self.who} still preparing its model after {LIMIT_S:g} s")
            if self.say and now >= say_at:  # when --timeout would have failed us, then less often
                print_rank(
                    f"{self.who} still preparing its model after {now - start:.0f} s "
                    f"(--timeout {self.timeout_s:g}); waiting, as that is not a fault"
                )
                say_at += SAY_EVERY_S
            time.sleep(POLL_S)

    # --8<-- [end:wait]


class StorePreparation(Preparation):
    """On a store that outlives every rank (torchrun's): the preparing rank sets "ready" when
    its model is, and beats meanwhile. connect(): a new client of that store (one per thread:
    a client is not shared between threads)."""

    def __init__(self, connect: Callable[[], dist.Store], who: str, timeout_s: float, say: bool):
        super().__init__(who, timeout_s, say)
        self.connect, self.store = connect, None

    @contextlib.contextmanager
    def preparing(self) -> Iterator[None]:
        stop = threading.Event()

        def beat():
            with contextlib.suppress(Exception):  # the run may be ending: nobody to tell
                store = self.connect()
                while True:
                    store.add("beats", 1)
                    if stop.wait(BEAT_S):
                        return

        beating = threading.Thread(target=beat, name="preparing-beat", daemon=True)
        beating.start()
        try:
            yield
        finally:
            stop.set()
            beating.join()
        self.connect().set("ready", "1")

    def look(self) -> tuple[bool, int | None]:
        self.store = self.store or self.connect()
        try:  # add(key, 0) reads a counter (0 if it was never set)
            return self.store.check(["ready"]), self.store.add("beats", 0)
        except RuntimeError as err:  # the store is gone: so is the run
            why = str(err).strip().splitlines()[0]
            raise PeerLost(f"lost the store while {self.who} prepared its model ({why})") from None
