"""Two ranks on one GPU: what NCCL says (docs/outputs/gpu/duplicate_gpu.txt, Troubleshooting)."""

import torch
import torch.distributed as dist

torch.cuda.set_device(0)  # the mistake: every rank picks GPU 0 instead of LOCAL_RANK
dist.init_process_group("nccl")
x = torch.ones(1, device="cuda")
dist.all_reduce(x)
