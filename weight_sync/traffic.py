"""Lesson 12's client side: LiveClient asks a LiveEngine (serve.py) for generation, Load sends
requests at a set rate and collects the replies; check_responses holds every reply against a
single-process greedy decode that switches weights at the same token; plot_timeline draws the
requests around the updates."""

from __future__ import annotations

import collections
import json
import threading
import time
from typing import Any

from weight_sync.control import EngineClient
from weight_sync.groups import seconds
from weight_sync.model import forward


class LiveClient(EngineClient):
    """An EngineClient that also asks for generation (not through the sequential control
    plane: the requests go straight to the scheduler's queue)."""

    def generate(self, prompt: list[int], max_new: int, min_version: int = 0) -> int:
        rid = self.store.add("gen_seq", 1)
        asked = {"prompt": prompt, "max_new": max_new, "min_version": min_version}
        self.store.set(f"gen/{rid}", json.dumps(asked))
        return rid

    def response(self, rid: int, timeout_s: float | None = None) -> dict[str, Any]:
        key = f"gen_rep/{rid}"
        self.store.wait([key], seconds(timeout_s or self.timeout_s))
        reply = json.loads(self.store.get(key))
        self.store.delete_key(key)
        return reply

    @property
    def version(self) -> int:
        """The engine's current weight version."""
        return self.call("get_version")[0]["version"]


class Load(threading.Thread):
    """A client issuing a request every `every_s` (prompts made from the request's number) on a
    connection of its own; a collector thread waits for the replies. An aborted request is sent
    again at once (a new id). `done` holds (prompt, reply, sent at, answered at) per request."""

    def __init__(self, address, timeout_s, every_s, max_new, prompt_len=4, vocab=384):
        super().__init__(daemon=True)
        # two connections: a store client serves one call at a time, and the collector waits
        self.client, self.answers = LiveClient(address, timeout_s), LiveClient(address, timeout_s)
        self.every_s, self.max_new, self.prompt_len, self.vocab = (
            every_s,
            max_new,
            prompt_len,
            vocab,
        )
        self.stopped, self.pending = threading.Event(), collections.deque()
        self.done, self.aborted, self.sent, self.errors = [], [], 0, []
        self.cond = threading.Condition()
        self.collector = threading.Thread(target=self._collect, daemon=True)
        self.collector.start()  # replies are collected from the first send on

    def prompt(self, n):
        return [(7 * n + 13 * i + 1) % self.vocab for i in range(self.prompt_len)]

    def send(self, prompt, min_version=0):
        sent = time.monotonic()
        rid = self.client.generate(prompt, self.max_new, min_version)
        with self.cond:
            self.sent += 1
            self.pending.append((rid, prompt, sent))
            self.cond.notify()

    def run(self) -> None:
        while not self.stopped.is_set():
            self.send(self.prompt(self.sent))
            self.stopped.wait(self.every_s)

    def _collect(self) -> None:
        while True:
            with self.cond:
                self.cond.wait_for(lambda: self.pending or self.stopped.is_set())
                if not self.pending:
                    return
                rid, prompt, sent = self.pending.popleft()
            try:
                reply = self.answers.response(rid)
            except Exception as err:
                self.errors.append(f"request {rid}: {type(err).__name__}: {err}")
                continue
            if reply.get("rid") != rid:  # the engine names the request it answers
                self.errors.append(f"request {rid}: its reply says it answers {reply.get('rid')}")
            if reply["status"] == "aborted":
                self.aborted.append((prompt, reply, sent, time.monotonic()))
                self.send(prompt)
            else:
                self.done.append((prompt, reply, sent, time.monotonic()))

    def finish(self, timeout_s: float = 60) -> None:
        """Stop issuing; wait until every request sent has its reply."""
        self.stopped.set()
        if self.ident is not None:  # started: it sends at a rate
            self.join(timeout_s)
        with self.cond:
            self.cond.notify_all()
        self.collector.join(timeout_s)


def reference_tokens(models, shape, prompt, versions) -> list[int]:
    """The single-process greedy decode of `prompt` that switches weights where the engine did:
    token i is the argmax of forward() over models[versions[i]] on the prompt and tokens 0..i-1
    (no KV cache: everything recomputed)."""
    tokens = []
    for version in versions:
        tokens.append(int(forward(models[version], shape, prompt + tokens).argmax()))
    return tokens


def check_responses(load: Load, models, shape, policy: str) -> dict[str, list[str]]:
    """What is wrong with the replies a Load got (each list empty: nothing), against the rules
    of `policy` and single-process references. models: {version: full weights}."""
    wrong = {"versions": [], "tokens": [], "once": [], "status": list(load.errors)}
    for prompt, reply, _, _ in load.done:
        rid, versions = reply["rid"], reply["versions"]
        if reply["status"] != "ok" or len(reply["tokens"]) != load.max_new:
            wrong["status"].append(f"request {rid}: {reply['status']} {reply['why']}")
            continue
        mixed = len(set(versions)) > 1
        if (policy != "keep" and mixed) or versions != sorted(versions):
            wrong["versions"].append(f"request {rid} ({policy}): versions {versions}")
        elif reply["tokens"] != reference_tokens(models, shape, prompt, versions):
            wrong["tokens"].append(f"request {rid}: {reply['tokens']} with versions {versions}")
    ids = [reply["rid"] for _, reply, _, _ in load.done + load.aborted]
    if len(ids) != load.sent or len(set(ids)) != len(ids):  # an aborted one is sent again
        wrong["once"].append(
            f"{load.sent} requests sent, {len(ids)} replies, {len(set(ids))} distinct"
        )
    return wrong


COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:olive")


def timeline_panels(runs, requests: int = 24) -> dict:
    """course/plots.timeline's panels for runs: {title: (Load, serving_stats)}, time 0 at each
    run's first commit. Per run: the commits (from the trainer's ask to the swap), the engine's
    steps, and the requests in flight at the first commit: its wait in the queue, then a box per
    token (from the one before, or from joining the batch) colored by the update whose weights
    produced it (an aborted request's tokens pale, outlined in red)."""
    panels = {}
    for title, (load, stats) in runs.items():
        commits = stats["commits"]
        t0, base = commits[0][0], commits[0][3] - 1  # the first commit; the weights before it

        def ms(t, t0=t0):
            return (t - t0) * 1e3

        def paint(version, base=base):
            n = version - base
            return COLORS[n % len(COLORS)], "old weights" if n == 0 else f"after update {n}"

        lanes = {"commit": [], "steps": []}
        for asked, locked, done, _, _ in commits:
            lanes["commit"].append(
                dict(start=ms(asked), end=ms(locked), color="0.7", kind="commit waits")
            )
            lanes["commit"].append(
                dict(start=ms(locked), end=ms(done) + 0.5, color="red", kind="swap")
            )
        for start, end, version, _ in stats["steps"]:
            lanes["steps"].append(dict(start=ms(start), end=ms(end), color=paint(version)[0]))
        first = commits[0]
        replies = sorted(load.done + load.aborted, key=lambda d: d[2])
        near = [d for d in replies if d[2] <= first[2] and d[3] >= first[0]]
        for _, reply, sent, _ in near[-requests:]:
            before = reply["admitted"] or sent
            boxes = [dict(start=ms(sent), end=ms(before), color="0.85", kind="in the queue")]
            for version, at in zip(reply["versions"], reply["times"]):
                color, kind = paint(version)
                box = dict(start=ms(before), end=ms(at), color=color, kind=kind)
                if reply["status"] != "ok":
                    box |= dict(edge="red", alpha=0.4)
                boxes.append(box)
                before = at
            lanes[f"{reply['status']} {reply['rid']}"] = boxes
        panels[title] = lanes
    return panels


def plot_timeline(runs, path, title: str, window=(-300, 900), requests: int = 12) -> None:
    """Runs ({panel title: (Load, serving_stats)}), as timeline_panels draws them, into `path`."""
    from course.plots import timeline

    panels = timeline_panels(runs, requests)
    timeline(panels, path, title, xlabel="ms from the first commit", window=window, lane=0.2)
