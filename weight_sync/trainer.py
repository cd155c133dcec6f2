"""The trainer's side of what lesson 09 does not teach: creating the weight-update group
(create_update_group: SGLang's init_weight_update_group, both ends) and the bookkeeping around
the fast push (FastUpdater: the metadata once, then one request and one push per update).
lessons/09_weight_update.py is the rest of the trainer's side, the push included."""
from __future__ import annotations

import time

import torch.distributed as dist

from weight_sync.control import parse_dtype
from weight_sync.groups import listening_store, make_group, seconds
from weight_sync.plan import Plan


# --8<-- [start:create_group]
def create_update_group(client, group_name, backend, device, *, warmup, timeout_s,
                        host="127.0.0.1"):
    """SGLang's init_weight_update_group, both ends: the trainer hosts the group's store on
    host:<free port>, asks every engine rank to join as rank 1 + tp_rank, and joins as rank 0."""
    if group_name in client.groups:
        raise ValueError(f"this trainer already has a weight-update group named {group_name!r}: "
                         "close it first or pick another name")
    store, port = listening_store(host, 0, seconds(timeout_s))
    store.set(f"announce/{group_name}", "1")  # engine ranks check the name before they join
    store.set("announced", ", ".join([*client.groups, group_name]))
    world_size = 1 + client.tp_size
    ticket = client.submit("init_weight_update_group", master_address=host, master_port=port,
                           rank_offset=1, world_size=world_size, group_name=group_name,
                           backend=backend, warmup=warmup)
    joining = [f"{group_name}/joining/{1 + r}" for r in range(client.tp_size)]
    deadline = time.monotonic() + timeout_s
    while not store.check(joining):  # an engine rank that refuses answers instead of joining
        if ticket.answered():
            ticket.result()  # raises the engine's reason
        if time.monotonic() > deadline:
            raise client.failure(ticket, f"group {group_name!r}: engine ranks did not join "
                                          f"within {timeout_s:g} s")
        time.sleep(0.001)
    group = make_group(dist.PrefixStore(f"{group_name}/", store), 0, world_size, backend, device,
                       seconds(timeout_s), group_name)
    group.store = store  # the store's server lives as long as the group
    if warmup:
        group.warm_up()
    ticket.result()
    client.groups[group_name] = group
    return group
# --8<-- [end:create_group]


class FastUpdater:
    """The trainer's side of the fast path: the metadata once (prepare), then one request and
    one push_update per update. push_update(group, plan, weights) is exercise 09.1."""

    def __init__(self, client, group, weights, push_update, *, bucket_bytes, resharding="shard"):
        self.client, self.group, self.weights = client, group, weights
        self.push_update = push_update
        self.bucket_bytes, self.resharding = bucket_bytes, resharding

    def prepare(self):
        """Send names, shapes and the wire dtype once; both sides then build the same Plan."""
        engine = self.client.call("describe")[0]
        names = list(self.weights)
        answer = self.client.call(
            "prepare_weights_update", group_name=self.group.name, names=names,
            dtypes=[engine["dtype"]] * len(names),  # convert on send: the wire carries the engine's
            shapes=[list(self.weights[n].shape) for n in names],
            bucket_bytes=self.bucket_bytes, resharding=self.resharding)[0]
        self.plan = Plan(answer["specs"], parse_dtype(answer["dtype"]), self.client.tp_size,
                         self.bucket_bytes, self.resharding)
        peers = sorted({b.dst for b in self.plan.buckets if b.dst is not None})
        if peers:  # NCCL sets up each point-to-point pair at its first send: do it now
            ticket = self.client.submit("warm_up", group_name=self.group.name, peers=peers)
            self.group.warm_up(peers)
            ticket.result()
        return self.plan

    def update(self):
        """Push the trainer's weights; returns every engine rank's answer (new version, times)."""
        for name, full, _ in self.plan.specs:  # refuse here, before a byte moves
            if tuple(self.weights[name].shape) != full:
                raise ValueError(f"shape mismatch for {name}: the trainer's is now "
                                 f"{tuple(self.weights[name].shape)}, the prepared {full}")
        self.called, self.table = time.monotonic(), None
        ticket = self.client.submit("update_weights", group_name=self.group.name)
        try:
            self.table = self.push_update(self.group, self.plan, self.weights)
        except Exception as err:
            raise self.client.failure(ticket, f"pushing the weights failed ({err})") from err
        self.pushed = time.monotonic()
        return ticket.result()
