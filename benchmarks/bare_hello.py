"""The baseline for benchmarks/startup.py: the smallest program torchrun can run, on the backend
a lesson would pick (NCCL when every local rank has a GPU, else gloo), so that the comparison is
like with like."""

import os

import torch
import torch.distributed as dist

local_rank, local_ranks = int(os.environ["LOCAL_RANK"]), int(os.environ["LOCAL_WORLD_SIZE"])
use_nccl = torch.cuda.is_available() and torch.cuda.device_count() >= local_ranks
device = torch.device("cuda", local_rank) if use_nccl else torch.device("cpu")
if use_nccl:
    torch.cuda.set_device(device)
dist.init_process_group("nccl" if use_nccl else "gloo")
value = torch.ones(1, device=device)
dist.all_reduce(value)
print(f"rank {dist.get_rank()}: {value.item()}")
dist.destroy_process_group()
