"""weight_sync: the inference engine of lesson 09, and what a trainer needs to update its weights.

lessons/09_weight_update.py is the trainer's side and reads without this package: it teaches the
naive update, timing it, and (exercise 09.1) the fast push. This package holds what the lesson
needs and does not teach: the model, the inference engine, its control plane, process groups
built from a store, the plan (layout, buckets, checksums) of the fast path, and SGLang's checks.

Modules (each one job; communication primitives apart from the code that uses them):
    model.py      LlamaShape, PRESETS, shape_from_hf, llama_specs, make_weights, forward: a
                  Llama model (HF's config and names; equal to transformers' LlamaForCausalLM)
                  and a TP forward pass over vLLM-style shards (greedy next token);
                  forward_cached, one step of a continuous batch with a KV cache per request
    vllm_layout.py  Span, vllm_specs, vllm_spans, hf_to_vllm, vllm_to_hf, check_engine_tp: how
                  a vLLM-style engine holds the model per TP rank (fused qkv_proj, gate_up_proj,
                  KV heads replicated when TP exceeds them), and HF <-> vLLM
    groups.py     make_group, Group, RecordingGroup, listening_store, store_client: process groups
                  built straight from a store (no default group needed, neither side's own world
                  is touched); every op returns a Work
    plan.py       Layout, cut_buckets, Plan, checksum_pieces, reference_checksums, digest: where
                  every tensor lives in a flat byte buffer, cut in buckets (each piece: which
                  part of which HF tensor), and the checksums
    control.py    EngineClient, Ticket, EngineError, Heartbeat: the control plane, JSON requests
                  and replies in a TCPStore that engine rank 0 hosts on 127.0.0.1. Every engine
                  rank answers every request itself.
    timing.py     Clock, broadcast_timing: device work and a broadcast, timed right
    engine.py     Engine, serve_engine: one TP rank of the engine, serving SGLang's
                  init_weight_update_group, update_weights_from_distributed (naive, one tensor
                  per request) and get_weights_by_name, by HF name (converted on load)
    fast_path.py  FastPath, a base class of Engine: the fast path's prepare_weights_update /
                  update_weights (staging, checksums, coverage, finite values, commit)
    trainer.py    create_update_group, destroy_update_group, FastUpdater, check_read_back,
                  check_generate: the trainer's side of a group's creation and end, of the
                  fast path, and of SGLang's checks
    megatron.py   megatron_spans, hf_to_megatron, megatron_to_hf: how a Megatron-style trainer
                  holds the model per TP, PP and DP rank (fused linear_qkv per query group,
                  linear_fc1 = [gate; up], stage-local layer numbers), and HF <-> Megatron
    reshard.py    the planner of lesson 10 (trainer spans x engine spans -> who sends which slice
                  to whom, each DP replica a disjoint share), its three routes (gather, direct,
                  two-stage) and the engine's verified, all-or-nothing update
    colocate.py   lesson 11: trainer and engine sharing a GPU: handles keyed by the physical GPU
                  (CUDA IPC; shared memory on CPU), the engine's flat layout and checksums, three
                  designs (fresh handles, a shared bucket, handles opened once and one fused
                  verified pull), and ChatLearn's two-stage route for a mixed GPU map
    moe.py        lesson 13: a mixture-of-experts variant of the model (router, routed experts,
                  an optional shared expert; HF's names), its specs, weights and a single-process
                  forward (top-k routing, ties broken by expert number)
    regroup.py    lesson 13: the trainer's routed experts regrouped among its ranks before the
                  update (all_to_all or all_gather over its expert groups), planned by reshard.py
    serve.py      lesson 12: LiveEngine, an Engine that serves generation while it is updated (a
                  continuous batch, greedy decoding with a KV cache per request, every token
                  tagged with its weight version; the commit between two steps under a
                  read-write lock or the seed's polling; policies drain, abort, keep)
    traffic.py    lesson 12's client side: LiveClient, Load (a client at a set rate), the checks
                  of the replies against one process's decode, the timeline picture
    __main__.py   an engine on its own

An engine on its own, as tests run it (to kill a trainer mid-transfer and keep the engine),
from the repository root:
    torchrun --nproc-per-node 2 -m weight_sync --port-file /tmp/engine.addr

What a trainer uses is named here, from the module that holds it:
    import weight_sync as ws
    ws.serve_engine(...); client = ws.engine_client(timeout_s)
    group = ws.create_update_group(client, "wu", "gloo", "cpu", warmup=True, timeout_s=20)
"""

from weight_sync.control import EngineError, engine_client
from weight_sync.engine import POLL_S, serve_engine
from weight_sync.groups import RecordingGroup
from weight_sync.model import PRESETS, forward, llama_specs, make_weights, shape_from_hf, shard_of
from weight_sync.plan import Plan, checksum_pieces, reference_checksums
from weight_sync.trainer import (
    FastUpdater,
    check_generate,
    check_read_back,
    create_update_group,
    destroy_update_group,
)
from weight_sync.vllm_layout import check_engine_tp, engine_tp_sizes, hf_to_vllm, vllm_to_hf

__all__ = [
    "POLL_S",
    "PRESETS",
    "EngineError",
    "FastUpdater",
    "Plan",
    "RecordingGroup",
    "check_generate",
    "check_read_back",
    "check_engine_tp",
    "checksum_pieces",
    "create_update_group",
    "destroy_update_group",
    "engine_client",
    "engine_tp_sizes",
    "forward",
    "hf_to_vllm",
    "llama_specs",
    "make_weights",
    "reference_checksums",
    "serve_engine",
    "shape_from_hf",
    "shard_of",
    "vllm_to_hf",
]
