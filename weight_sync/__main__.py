"""An engine on its own, one TP rank per torchrun rank: the tests' way of running it (to kill a
trainer mid-transfer and keep the engine). From the repository root:
    torchrun --nproc-per-node 2 -m weight_sync --port-file /tmp/engine.addr
Engine rank 0 hosts the control plane and writes its HOST:PORT to --port-file; the engine
serves until a client asks it to shut down, or until no request came for --idle seconds.
"""

import argparse
import os

import torch

from course.ranks import seconds_above_0, usage_error
from weight_sync.engine import serve_engine
from weight_sync.model import PRESETS
from weight_sync.vllm_layout import check_engine_tp


def main() -> None:
    """An engine on its own, one TP rank per torchrun rank (the tests' way of running it)."""
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--seed", type=int, default=1, help="the model it starts with (1: model A)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--port-file", help="write HOST:PORT of the control plane here")
    p.add_argument(
        "--timeout", type=seconds_above_0("--timeout"), default=30.0, help="seconds a wait may take"
    )
    p.add_argument(
        "--idle", type=seconds_above_0("--idle"), default=120.0, help="stop after this long idle"
    )
    p.add_argument("--poll-ms", type=float, default=0.0, help="nap between looks (0: block)")
    p.add_argument("--backend", choices=["gloo", "nccl"], default="gloo")
    args = p.parse_args()
    if not args.poll_ms >= 0:
        usage_error(f"--poll-ms {args.poll_ms:g}: give 0 (block) or a nap in milliseconds above 0")
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    try:  # before anything runs: every rank says so, and none starts the engine
        check_engine_tp(PRESETS[args.preset], size)
    except ValueError as err:
        usage_error(f"{args.preset} on {size} engine ranks: {err}")
    device = "cpu"
    if args.backend == "nccl":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    serve_engine(
        rank,
        size,
        args.backend,
        device,
        preset=args.preset,
        seed=args.seed,
        dtype=args.dtype,
        timeout_s=args.timeout,
        idle_s=args.idle,
        poll_s=args.poll_ms / 1e3 or None,
        port_file=args.port_file,
    )


if __name__ == "__main__":
    main()
