"""The control plane: requests and replies, as JSON, in a TCPStore that engine rank 0 hosts on
127.0.0.1. The trainer's EngineClient sends each request to every engine rank and each answers
it itself, so a rank that refuses, fails or died is named; each rank's Heartbeat tells a dead
rank from a silent one."""

from __future__ import annotations

import contextlib
import datetime
import json
import threading
import time
from typing import Any

import torch
import torch.distributed as dist

from weight_sync.groups import Group, _sessions, seconds, store_client, torchrun_store

HEARTBEAT_S = 0.2  # every engine rank bumps a counter this often; a dead rank's counter stops


class EngineError(RuntimeError):
    """The engine refused a request, failed it, died, or did not answer in time."""


class Refused(Exception):
    """Raised inside the engine for a request it will not carry out; the reply says why."""


def parse_dtype(text: str | torch.dtype) -> torch.dtype:
    dtype = getattr(torch, str(text).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise Refused(f"dtype mismatch: {text!r} is not a torch dtype")
    return dtype


class Ticket:
    """A request on its way: result() waits for every engine rank's answer."""

    def __init__(self, client: EngineClient, number: int, op: str) -> None:
        self.client, self.number, self.op = client, number, op
        self.keys = [f"rep/{number}/{r}" for r in range(client.tp_size)]

    def answered(self) -> bool:
        """Has any engine rank answered yet? (Checked, not waited for.)"""
        return any(self.client.store.check([key]) for key in self.keys)

    def answers(self) -> dict[int, dict[str, Any]]:
        """{tp rank: reply} of the ranks that have answered so far."""
        return {
            r: json.loads(self.client.store.get(key))
            for r, key in enumerate(self.keys)
            if self.client.store.check([key])
        }

    def result(self, timeout_s: float | None = None) -> list[Any]:
        """Every engine rank's result, in TP-rank order. EngineError names the ranks that refused
        or failed (with their reasons), died (heartbeat stopped) or did not answer in time."""
        timeout_s = timeout_s or self.client.timeout_s
        try:  # wakes up as soon as the last rank has answered
            self.client.store.wait(self.keys, seconds(timeout_s))
        except dist.DistNetworkError as err:
            raise self.client.lost(self.op, err) from None
        except RuntimeError:
            raise self.client.failure(self, f"{self.op}: no answer in {timeout_s:g} s") from None
        replies = [json.loads(self.client.store.get(key)) for key in self.keys]
        for key in [*self.keys, f"req/{self.number}"]:
            self.client.store.delete_key(key)
        errors = {}  # the same reason from several ranks is said once
        for r, reply in enumerate(replies):
            if not reply["ok"]:
                errors.setdefault(reply["error"], []).append(str(r))
        if errors:
            raise EngineError(
                f"{self.op} failed: "
                + "; ".join(
                    f"engine rank{'s' * (len(ranks) > 1)} {', '.join(ranks)}: {error}"
                    for error, ranks in errors.items()
                )
            )
        return [reply["result"] for reply in replies]


class EngineClient:
    """The trainer's end of the control plane. Each request goes to every engine rank, and each
    answers it, so a rank that refuses, fails or died is named."""

    def __init__(self, address: str, timeout_s: float) -> None:
        self.address, self.timeout_s = address, timeout_s
        self.store = store_client(address, seconds(timeout_s))
        self.store.wait(["tp_size"])
        self.tp_size = int(self.store.get("tp_size"))
        self.groups: dict[str, Group] = {}  # this trainer's weight-update groups, by name

    def submit(self, op: str, **args: Any) -> Ticket:
        number = self.store.add("seq", 1)  # atomic: requests from several clients never collide
        self.store.set(f"req/{number}", json.dumps({"op": op, "args": args}))
        return Ticket(self, number, op)

    def call(self, op: str, **args: Any) -> list[Any]:
        return self.submit(op, **args).result()

    def alive(self, wait_s: float = 4 * HEARTBEAT_S) -> list[bool]:
        """For each engine rank: did its heartbeat counter move during wait_s?"""
        before = [self.store.add(f"alive/{r}", 0) for r in range(self.tp_size)]
        time.sleep(wait_s)
        return [self.store.add(f"alive/{r}", 0) != b for r, b in enumerate(before)]

    def lost(self, op: str, err: Exception) -> EngineError:
        return EngineError(
            f"{op}: lost the engine's control plane at {self.address} (engine rank "
            f"0 hosts it: is the engine down?): {str(err).splitlines()[0]}"
        )

    def failure(self, ticket: Ticket, why: str) -> EngineError:
        """An EngineError that says, for every engine rank, what became of `ticket`."""
        try:
            alive, answers, parts = self.alive(), ticket.answers(), []
        except dist.DistNetworkError as err:
            return self.lost(f"{why}; then", err)
        for r in range(self.tp_size):
            if r in answers and not answers[r]["ok"]:
                parts.append(f"engine rank {r}: {answers[r]['error']}")
            elif not alive[r]:
                parts.append(
                    f"engine rank {r} (weight-update rank {1 + r}) is dead: its heartbeat stopped"
                )
            elif r not in answers:
                parts.append(f"engine rank {r} is alive but has not answered")
        return EngineError(f"{why}; " + "; ".join(parts))

    def shutdown(self, timeout_s: float | None = None) -> None:
        """Stop the engine: every rank answers, then rank 0 waits for this 'bye' before it takes
        the control plane down."""
        try:
            ticket = self.submit("shutdown")
            try:
                ticket.result(timeout_s)
            finally:  # even if a rank is dead: rank 0 need not wait for the bye
                with contextlib.suppress(RuntimeError):
                    self.store.set(f"bye/{ticket.number}", "1")
        finally:
            for group in self.groups.values():
                group.close()


def engine_client(timeout_s: float) -> EngineClient:
    """The trainer's client of the engine that ranks 1.. of this torchrun job serve."""
    session = next(_sessions)
    store = torchrun_store(seconds(timeout_s))
    key = f"course09/{session}/control"
    store.wait([key])  # engine rank 0 publishes where its control plane listens
    return EngineClient(store.get(key).decode(), timeout_s)


class Heartbeat(threading.Thread):
    """Bumps alive/<tp rank> every HEARTBEAT_S, on a connection of its own."""

    def __init__(self, address: str, tp_rank: int, timeout: datetime.timedelta) -> None:
        super().__init__(daemon=True)
        self.store = store_client(address, timeout)
        self.key, self.stopped = f"alive/{tp_rank}", threading.Event()

    def run(self) -> None:
        with contextlib.suppress(Exception):  # the control plane went away: stop quietly
            while not self.stopped.wait(HEARTBEAT_S):
                self.store.add(self.key, 1)
