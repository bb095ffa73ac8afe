"""The IGR-SR harness: data, the shared trainer, studies, experiments and reports."""
import os

# A CPU bf16 matmul runs through oneDNN, which compiles a kernel per new shape (about 30 ms
# here) and keeps 1,024 of them by default. A training epoch meets a few thousand shapes (batch
# rows x history length vary, each linear layer has three matmuls), so with the default every
# epoch compiled them again and bf16 ran slower than fp32. Read by oneDNN at its first matmul,
# so it is set before torch is used; a user's own setting wins.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "16384")
