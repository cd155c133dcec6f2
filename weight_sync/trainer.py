"""The trainer's side of what lesson 09 does not teach: creating the weight-update group
(create_update_group: SGLang's init_weight_update_group, both ends), the bookkeeping around
the fast push (FastUpdater: the metadata once, then one request and one push per update), and
SGLang's checks of an update (check_read_back, check_generate).
lessons/09_weight_update.py is the rest of the trainer's side, the push included."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from weight_sync.control import EngineClient, parse_dtype
from weight_sync.groups import Group, listening_store, make_group, seconds
from weight_sync.model import LlamaShape, Weights, forward
from weight_sync.plan import Plan

# Exercise 09.1's push: (group, plan, weights) -> the checksum table it sent.
PushUpdate = Callable[[Group, Plan, Weights], torch.Tensor]
# Read back after an update, as SGLang's test of this API does: its first rows, gathered.
SAMPLED = (
    "model.embed_tokens.weight",
    "model.layers.1.self_attn.o_proj.weight",
    "model.norm.weight",
    "lm_head.weight",
)
PROMPT = [5, 17, 42, 101]  # token ids: the engine's greedy next token must match the reference


# --8<-- [start:create_group]
def create_update_group(
    client: EngineClient,
    group_name: str,
    backend: str,
    device: torch.device | str,
    *,
    warmup: bool,
    timeout_s: float,
    host: str = "127.0.0.1",
) -> Group:
    """SGLang's init_weight_update_group, both ends: the trainer hosts the group's store on
    host:<free port>, asks every engine rank to join as rank 1 + tp_rank, and joins as rank 0."""
    if group_name in client.groups:
        raise ValueError(
            f"this trainer already has a weight-update group named {group_name!r}: "
            "destroy_update_group it first, or pick another name"
        )
    store, port = listening_store(host, 0, seconds(timeout_s))
    store.set(f"announce/{group_name}", "1")  # engine ranks check the name before they join
    store.set("announced", ", ".join([*client.groups, group_name]))
    world_size = 1 + client.tp_size
    ticket = client.submit(
        "init_weight_update_group",
        master_address=host,
        master_port=port,
        rank_offset=1,
        world_size=world_size,
        group_name=group_name,
        backend=backend,
        warmup=warmup,
    )
    joining = [f"{group_name}/joining/{1 + r}" for r in range(client.tp_size)]
    deadline = time.monotonic() + timeout_s
    while not store.check(joining):  # an engine rank that refuses answers instead of joining
        if ticket.answered():
            ticket.result()  # raises the engine's reason
        if time.monotonic() > deadline:
            raise client.failure(
                ticket, f"group {group_name!r}: engine ranks did not join within {timeout_s:g} s"
            )
        time.sleep(0.001)
    group = make_group(
        dist.PrefixStore(f"{group_name}/", store),
        0,
        world_size,
        backend,
        device,
        seconds(timeout_s),
        group_name,
    )
    group.store = store  # the store's server lives as long as the group
    if warmup:
        group.warm_up()
    ticket.result()
    client.groups[group_name] = group
    return group


# --8<-- [end:create_group]


def destroy_update_group(client: EngineClient, group_name: str) -> None:
    """SGLang's destroy_weights_update_group, both ends: the engine ranks leave and forget the
    group (and the updates prepared on it), then the trainer; its name is free again."""
    if group_name not in client.groups:
        raise ValueError(f"this trainer has no weight-update group named {group_name!r}")
    client.call("destroy_weights_update_group", group_name=group_name)
    client.groups.pop(group_name).close()


class FastUpdater:
    """The trainer's side of the fast path: the metadata once (prepare), then one request and
    one push_update per update. push_update(group, plan, weights) is exercise 09.1."""

    def __init__(
        self,
        client: EngineClient,
        group: Group,
        weights: Weights,
        push_update: PushUpdate,
        *,
        bucket_bytes: int,
        resharding: str = "shard",
    ) -> None:
        self.client, self.group, self.weights = client, group, weights
        self.push_update = push_update
        self.bucket_bytes, self.resharding = bucket_bytes, resharding

    def prepare(self) -> Plan:
        """Send names, shapes and the wire dtype once; both sides then build the same Plan."""
        engine = self.client.call("describe")[0]
        names = list(self.weights)
        answer = self.client.call(
            "prepare_weights_update",
            group_name=self.group.name,
            names=names,
            dtypes=[engine["dtype"]] * len(names),  # convert on send: the wire carries the engine's
            shapes=[list(self.weights[n].shape) for n in names],
            bucket_bytes=self.bucket_bytes,
            resharding=self.resharding,
        )[0]
        self.plan = Plan(
            LlamaShape(**answer["shape"]),
            parse_dtype(answer["dtype"]),
            self.client.tp_size,
            self.bucket_bytes,
            self.resharding,
        )
        peers = sorted({b.dst for b in self.plan.buckets if b.dst is not None})
        if peers:  # NCCL sets up each point-to-point pair at its first send: do it now
            ticket = self.client.submit("warm_up", group_name=self.group.name, peers=peers)
            self.group.warm_up(peers)
            ticket.result()
        return self.plan

    def update(self) -> list[Any]:
        """Push the trainer's weights; returns every engine rank's answer (new version, times)."""
        if getattr(self, "plan", None) is None:
            raise RuntimeError("FastUpdater.update() before prepare(): call prepare() once first")
        for name, full, _ in self.plan.specs:  # refuse here, before a byte moves
            if tuple(self.weights[name].shape) != full:
                raise ValueError(
                    f"shape mismatch for {name}: the trainer's is now "
                    f"{tuple(self.weights[name].shape)}, the prepared {full}"
                )
        self.called, self.table = time.monotonic(), None
        ticket = self.client.submit(
            "update_weights",
            group_name=self.group.name,
            bucket_bytes=self.bucket_bytes,
            resharding=self.resharding,
        )
        try:
            self.table = self.push_update(self.group, self.plan, self.weights)
        except Exception as err:
            raise self.client.failure(ticket, f"pushing the weights failed ({err})") from err
        self.pushed = time.monotonic()
        return ticket.result()


# --8<-- [start:read_back]
def check_read_back(
    client: EngineClient, expected: Weights, other: Weights, dtype: torch.dtype, rows: int = 4
) -> None:
    """SGLang's test of this API: sampled tensors read back from the engine (their first rows,
    gathered over its TP ranks) equal the model we expect, as the engine holds it (in `dtype`),
    and differ from the other one. Raises AssertionError, naming the tensor, if not."""
    for name in SAMPLED:
        answer = client.call("get_weights_by_name", name=name, truncate_size=rows)
        got = torch.tensor(answer[0])  # TP rank 0's answer
        want, not_want = (m[name][:rows].to(dtype).float().cpu() for m in (expected, other))
        assert torch.equal(got, want), f"{name} read back: {got}, expected {want}"
        assert not torch.equal(got, not_want), f"{name} read back still equals the other model"
    # --8<-- [end:read_back]


def check_generate(
    client: EngineClient, weights: Weights, dtype: torch.dtype, shape: LlamaShape
) -> int:
    """Every engine rank's greedy next token after PROMPT and its logits (a forward pass over
    its TP ranks, on vLLM-style shards) against the single-process forward pass of `weights`,
    HF's tensors as the engine holds them (in `dtype`). Returns the token; raises
    AssertionError if a rank disagrees (logits: beyond 1e-4, the TP sums' rounding)."""
    held = {name: w.to(dtype) for name, w in weights.items()}
    reference = forward(held, shape, PROMPT).cpu()
    expected = int(reference.argmax())
    for r, answer in enumerate(client.call("generate", tokens=PROMPT, logits=True)):
        gap = (torch.tensor(answer["logits"]) - reference).abs().max().item()
        assert answer["token"] == expected and gap < 1e-4, (
            f"engine rank {r} said token {answer['token']}, the reference {expected}; "
            f"largest logit gap {gap:.2e}"
        )
    return expected
