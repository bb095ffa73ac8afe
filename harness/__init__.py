"""The IGR-SR harness: data, the shared trainer, studies, experiments and reports."""
import os

# A CPU bf16 matmul runs through oneDNN, which compiles a kernel per new shape (about 1-30 ms
# here) and keeps 1,024 of them by default, each holding about 1 MB (more for the output
# layer's). The models pad their matmuls' row counts to a fixed grid under CPU bf16
# (`models.base.linear`, the output layer's blocks), so a model meets a bounded few hundred to
# ~1,000 shapes, which 4,096 holds with room to spare: no epoch compiles them again, and the
# cache stays within a few GB (at 16,384, with unpadded shapes, a ReaRec run at batch 2048 grew
# to 13 GB in 7 epochs). Read by oneDNN at its first matmul, so it is set before torch is used;
# a user's own setting wins.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "4096")
