"""The IGR-SR harness: data, the shared trainer, studies, experiments and reports."""
import os

# A CPU bf16 matmul runs through oneDNN, which compiles a kernel per new shape (about 1-30 ms
# here) and keeps 1,024 of them by default, each holding about 1 MB (more for the output
# layer's). An epoch meets hundreds to thousands of shapes (batch rows x history length vary),
# so with the default every epoch compiled them again and bf16 ran slower than fp32; with no
# bound (16,384 here before) a process kept every kernel it ever compiled (SASRec: +80-260 MB
# per 60 batches). The linear layers pad their rows to a fixed grid under CPU bf16
# (`models.base.linear`), so their kernels are a bounded few hundred; 4,096 holds them and
# attention's small ones, and caps the cache at a few GB. Read by oneDNN at its first matmul,
# so it is set before torch is used; a user's own setting wins.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "4096")
