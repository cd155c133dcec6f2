"""Lesson 02's shape handshake as a protocol: its one copy, which lesson 02's exercise, lesson 06
and distill_demo use. Lesson 02 explains it; this file only holds the agreed numbers.

Every message is a header, then, if the header says TENSOR, the payload. The header has the
same length whatever it describes, so that the receiver can allocate it before it knows
anything: len(HEADER) int64s, on the payload's device.
"""

import torch

# --8<-- [start:header]
HEADER = ("kind", "dtype code", "ndim", "size 0", "size 1", "size 2", "size 3",
          "size 4", "size 5", "size 6", "size 7")
MAX_NDIM = len(HEADER) - 3  # 8 sizes: tensors of 0 to 8 dimensions; unused sizes are 0
# Field 0, the kind of message: values that a payload read by mistake is unlikely to hold.
TENSOR = 20_202  # a payload of this dtype and shape follows
REFUSED = 20_203  # the sender could not describe its tensor (and raised): nothing follows
STOP = 20_204  # lesson 06: no payload follows, and none will: training is over
# Any other kind is not a header (e.g. a payload read where a header was expected): refuse it.
# The dtypes both gloo and NCCL carry (NCCL has no 16-bit integers); dtype code = position.
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64,
          torch.int32, torch.int8, torch.uint8, torch.bool)
# --8<-- [end:header]
