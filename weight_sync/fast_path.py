"""The engine's half of the fast path (exercise 09.1 is the trainer's half): the metadata once
(prepare_weights_update), then for each update every bucket received into staging, each piece
checksummed as it lands, every tensor's coverage checked, and a commit only if every TP rank
can take the update (update_weights). FastPath is a base class of Engine (engine.py): its
methods use the engine's state (layout, live and staging, groups, plans, its TP group)."""

from __future__ import annotations

import collections
import os
import time
from typing import Any

import torch
import torch.distributed as dist

from weight_sync.control import Refused, parse_dtype
from weight_sync.plan import Plan, checksum_pieces, lay_out_shards
from weight_sync.timing import Clock
from weight_sync.vllm_layout import narrow


class FastPath:
    """The Engine's requests of the fast path, and the receive, verify and commit behind them."""

    def op_describe(self) -> dict[str, Any]:
        """The model's config (a LlamaShape), the HF tensors an update names (HF name, full
        shape, TP split dim), the engine's dtype and TP size."""
        return {
            "shape": self.shape._asdict(),
            "specs": self.specs,
            "dtype": str(self.dtype),
            "tp_size": self.tp_size,
            "version": self.version,
        }

    def op_prepare_weights_update(
        self,
        group_name: str,
        names: list[str],
        dtypes: list[str],
        shapes: list[list[int]],
        bucket_bytes: int,
        resharding: str = "shard",
    ) -> dict[str, Any]:
        """The metadata, once: check every declared tensor and that they cover the model, then
        plan the buckets. Nothing is received: a bad update is refused before any byte moves."""
        self._group(group_name)
        if not len(names) == len(dtypes) == len(shapes):
            raise Refused(
                f"{len(names)} names, {len(dtypes)} dtypes, {len(shapes)} shapes: one of each "
                f"per tensor (nothing received; version {self.version} kept)"
            )
        problems = [
            p
            for n, d, s in zip(names, dtypes, shapes)
            if (p := self._mismatch(n, parse_dtype(d), s, wire=True))
        ]
        missing = [n for n in self.full if n not in set(names)]
        if missing:
            problems.append(
                f"the update does not cover {len(missing)} tensor(s) of the engine: "
                + ", ".join(missing[:3])
                + (" ..." if len(missing) > 3 else "")
            )
        if len(set(names)) != len(names):
            problems.append("the update names a tensor twice")
        if problems:
            raise Refused(
                "; ".join(problems[:4])
                + (" ..." if len(problems) > 4 else "")
                + f" (nothing received; version {self.version} kept)"
            )
        plan = Plan(self.shape, self.dtype, self.tp_size, bucket_bytes, resharding)
        positions = plan.table_positions(self.tp_rank)  # where my checksums are in the table
        plan.my_sums = torch.tensor(
            [at + i for b, at in positions for i in range(len(b.pieces))], device=self.device
        )
        # Keyed by how it cuts the buckets too: a second updater preparing on the same group
        # (another bucket size, another resharding) must not change the plan the first sends by.
        self.plans[group_name, bucket_bytes, resharding] = plan
        plan.wire_buffer = (  # each plan its own: another group's prepare must not take it
            torch.empty(plan.wire.size, dtype=torch.uint8, device=self.device)
            if plan.slices_after_broadcast
            else None
        )
        return {
            "shape": self.shape._asdict(),
            "dtype": str(self.dtype),
            "buckets": len(plan.buckets),
        }

    def op_warm_up(self, group_name: str, peers: list[int]) -> dict[str, Any]:
        self._group(group_name).warm_up(peers)
        return {}

    # --8<-- [start:commit]
    def op_update_weights(
        self, group_name: str, bucket_bytes: int, resharding: str = "shard"
    ) -> dict[str, Any]:
        """Receive the buckets prepared for (group_name, bucket_bytes, resharding) into staging,
        check the trainer's checksums and that every tensor arrived; only if every engine rank
        can, commit: swap staging and live, bump the version. Otherwise every rank keeps its
        live weights and version."""
        group = self._group(group_name)
        if (group_name, bucket_bytes, resharding) not in self.plans:
            raise Refused(
                f"no update prepared on group {group_name!r} with bucket_bytes {bucket_bytes} "
                f"and resharding {resharding!r}: prepare_weights_update first"
            )
        plan = self.plans[group_name, bucket_bytes, resharding]
        times, broken = {"picked_up": time.monotonic()}, False
        try:
            mine, theirs, positions, clock = self._receive(group, plan)
            problem = self._verify(mine, theirs, positions)  # holds the update's one host sync
            times["verified"] = time.monotonic()
            times["data_in"] = times["verified"] - clock()  # when the last byte had arrived
        except Exception as err:  # the trainer died, a peer vanished, a timeout
            problem, broken = f"the transfer failed ({type(err).__name__}: {err})", True
        # TP ranks commit together or not at all, and drop a broken group together: the vote is
        # the least of 2 (take it), 1 (refuse it), 0 (refuse it, the group is broken)
        vote = self._least(0 if broken else 1 if problem else 2)
        if vote < 2:
            problem = problem or "another engine rank could not take it (its answer says why)"
            broken = vote == 0
            if broken:  # the group's connections are gone on some rank: it cannot carry another
                self._drop_group(group_name)
            self.log(f"update rejected, kept version {self.version}: {problem}")
            dropped = f"; group {group_name!r} dropped, create a new one" if broken else ""
            raise Refused(
                f"{problem}: update rejected on every engine rank, version "
                f"{self.version} kept{dropped}"
            )
        self._commit()
        times["committed"] = time.monotonic()
        return {"version": self.version, **times}

    def _commit(self) -> None:
        """Swap staging and live, bump the version (lesson 12's serving engine does it between
        two generation steps, under its lock)."""
        self.live, self.staging = self.staging, self.live  # the commit: a swap, nothing copied
        self.weights, self.staged = self.staged, self.weights
        self.version += 1

    # --8<-- [end:commit]

    def _verify(self, mine, theirs, positions):
        """None if every checksum matches, every tensor fully arrived and holds only finite
        values; else what is wrong. Its one host sync reads all three at once."""
        views = list(self.staged.values())
        finite = torch.stack([torch.isfinite(v).all() for v in views])
        bad, finite = (mine != theirs).nonzero().flatten().tolist(), finite.tolist()
        pieces = [p for b, _ in positions for p in b.pieces]
        if bad:
            names = ", ".join(
                f"{pieces[i].name} rows {pieces[i].start}:{pieces[i].stop}" for i in bad[:3]
            )
            return f"checksum mismatch on engine rank {self.tp_rank} in {names}" + (
                " ..." if len(bad) > 3 else ""
            )
        rows = collections.Counter()
        for p in pieces:
            rows[p.name] += p.stop - p.start
        uncovered = [e.name for e in self.layout.entries if rows[e.name] != e.shape[0]]
        if uncovered:
            return (
                f"coverage: {len(uncovered)} tensor(s) did not fully arrive on engine rank "
                f"{self.tp_rank}: {', '.join(uncovered[:3])}"
            )
        if not all(finite):  # checksums match what the trainer sent: it sent a NaN or an Inf
            e = self.layout.entries[finite.index(False)]
            view = self.staged[e.name]
            s = next(
                s for s in e.spans if not torch.isfinite(narrow(view, s.dim, s.start, s.stop)).all()
            )
            return (
                f"non-finite value (NaN or Inf) in {s.hf_name} (in {e.name} rows "
                f"{s.start}:{s.stop} on engine rank {self.tp_rank})"
                if s.dim == 0
                else f"non-finite value (NaN or Inf) in {s.hf_name} (in {e.name} on engine "
                f"rank {self.tp_rank})"
            )
        return None

    def _least(self, value: int) -> int:
        """The least of every engine rank's value (a rank that does not answer: 0)."""
        if self.tp_size == 1:
            return value
        vote = torch.tensor([float(value)], device=self.device)
        try:
            self.tp.all_reduce(vote, dist.ReduceOp.MIN).wait()
        except Exception:
            return 0
        return int(vote.item())

    # --8<-- [start:receive]
    def _receive(self, group, plan):
        """Every byte of this rank's buckets into staging, and the trainer's checksum table.
        Returns (my checksums, the trainer's for my pieces, my buckets, a clock)."""
        r, device = self.tp_rank, self.device
        positions = plan.table_positions(r)
        table = torch.empty(plan.n_sums, dtype=torch.int64, device=device)
        clock = Clock(device)
        if plan.slices_after_broadcast:  # every wire bucket, then cut this rank's shard out
            wire = plan.wire_buffer
            works = [group.broadcast(wire[b.start : b.end], 0) for b in plan.buckets]
            works.append(group.broadcast(table, 0))
            for work in works:
                work.wait()
            clock.mark()
            lay_out_shards(self.layout, plan.wire.views(wire), self.staging)
            sums = [checksum_pieces(b, self.staging[b.start : b.end]) for b, _ in positions]
        else:  # straight into staging: its layout is the wire's
            mine = [b for b in plan.buckets if b.dst in (None, 1 + r)]
            works = [
                group.recv(self.staging[b.start : b.end], 0)
                if b.dst is not None
                else group.broadcast(self.staging[b.start : b.end], 0)
                for b in mine
            ]
            table_work = group.broadcast(table, 0)  # sent last, after every bucket
            sums = []
            for count, (b, work) in enumerate(zip(mine, works), 1):
                work.wait()  # gloo: the bytes are here; NCCL: the checksum below waits for them
                if count == len(mine):
                    clock.mark()
                self._maybe_die(count)
                sums.append(checksum_pieces(b, self.staging[b.start : b.end]))
            table_work.wait()
        return torch.cat(sums), table[plan.my_sums], positions, clock.since

    # --8<-- [end:receive]

    def _maybe_die(self, buckets_received):
        fault = self.fault
        fault = fault if fault and fault["tp_rank"] == self.tp_rank else None
        if fault and buckets_received >= fault["after_buckets"]:
            self.log(f"fault injected: dying after {buckets_received} bucket(s)")
            os._exit(0)  # exit code 0: torchrun keeps the other engine ranks running
