"""The baseline for benchmarks/startup.py: the smallest gloo program torchrun can run."""
import torch
import torch.distributed as dist

dist.init_process_group("gloo")
value = torch.ones(1)
dist.all_reduce(value)
print(f"rank {dist.get_rank()}: {value.item()}")
dist.destroy_process_group()
