"""A fused CPU kernel for ReaRec-ERL's objective, in plain C, built on first use and handed to
`models.losses` (models stay pure torch: building and caching a shared library is I/O).

Why: ERL's objective needs, for every (row, step, item), the step's softmax, its difference to
the ensemble's logits, their expectation and the resulting logit gradient, plus the ensemble's
own softmax. In eager torch that is about nine passes over (rows x steps x items) fp32 tensors,
3.8 ns per element on one thread (a third of an ERL step on Toys). Here each row's logits are
read once into a cache-sized buffer and every pass runs there: 1.5 ns per element (bf16 logits)
or 2.0 (fp32) on one thread, 0.74 / 0.91 on two. torch.compile (inductor) fused the same
formula to about 2 ns per element, with a 15 s compile per shape.

What it computes (`erl_rows`): for logits z (rows, T, N) in bf16 or fp32, each row's ensemble
NLL (-log softmax(mean_j z_j)[target]), E_{p_j}[w_j] per step with w_j = z_j - mean z, and the
logit gradient of every step, c p_j (w_j - E_pj[w_j]) + inv (softmax(mean) - one-hot), in z's
dtype (bf16 rounded to nearest even), ready for the gradient matmuls: what the eager formula in
`models.losses` computes (there the two terms go through W separately); both are tested against
the reference objective (tests/test_losses.py). Its exp is a degree-6
polynomial (relative error about 1e-7) with arguments clamped at -87: a probability below 1e-38
comes out as about 1e-38 instead of a denormal or zero (denormals make later passes several
times slower on x86; the difference is below any fp32 tolerance).

Build: `cc -O3 -march=native -fopenmp`, cached per source, compiler and CPU in the run's cache
directory (`kernels/`). No compiler, a failed build, or HARNESS_NATIVE=0: the eager path, with
one warning (none for HARNESS_NATIVE=0). `install()`, called where a run builds a model that
needs it, hands the kernel to `models.losses`. Threads: the rows are split over torch's
intra-op thread count by OpenMP; loaded into torch's process the library binds to torch's own
OpenMP runtime (the same soname), so its threads are torch's. With a second pool (pthreads),
torch's idle OpenMP threads spun against it after every matmul: 8.1 -> 12.9 ms per call. The
call releases the GIL."""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

SOURCE = r"""
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline float bf16_to_f32(uint16_t v) { uint32_t u = (uint32_t)v << 16; float f; memcpy(&f, &u, 4); return f; }

static inline uint16_t f32_to_bf16(float f) {  /* round to nearest even, as torch does */
    uint32_t u; memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float exp_poly(float x) {  /* exp(x), x clamped to [-87, 88]: vectorisable */
    x = x < -87.0f ? -87.0f : x;
    x = x > 88.0f ? 88.0f : x;
    float k = rintf(x * 1.44269504089f);
    float f = x - k * 0.693145751953125f - k * 1.428606765330187e-06f;
    float p = 1.0f + f * (1.0f + f * (0.5f + f * (0.16666667163f + f * (0.04166666791f
              + f * (0.00833333377f + f * 0.00138888892f)))));
    int32_t bits = ((int32_t)k + 127) << 23;
    float scale; memcpy(&scale, &bits, 4);
    return p * scale;
}

/* out[n] = c (g[n] - p[n] acc) + q[n], in fp32 or rounded to bf16 */
static void store_grad(void *out, int64_t at, const float *g, const float *p, float acc, float c, const float *q,
                       int64_t N, int bf16) {
    if (bf16) { uint16_t *o = (uint16_t *)out + at;
        #pragma omp simd
        for (int64_t n = 0; n < N; n++) o[n] = f32_to_bf16(c * (g[n] - p[n] * acc) + q[n]); }
    else { float *o = (float *)out + at;
        #pragma omp simd
        for (int64_t n = 0; n < N; n++) o[n] = c * (g[n] - p[n] * acc) + q[n]; }
}

/* rows r0..r1 of z (R, T, N): each row's NLL and E_pj[w_j] (T), and, if grad is not NULL, its
   logit gradient c p_j (w_j - E_pj[w_j]) + inv (softmax(mean) - one-hot), (T, N) */
static int run_rows(const void *z_, const int64_t *target, void *grad, float *nll, float *ew,
                    int64_t r0, int64_t r1, int64_t T, int64_t N, int bf16, float c, float inv) {
    float *buf = (float *)malloc((size_t)(T + 4) * N * sizeof(float) + (size_t)T * sizeof(float));
    if (!buf) return 1;
    float *zf = buf, *zm = buf + T * N, *e = zm + N, *g = e + N, *q = g + N, *mx = q + N;
    for (int64_t r = r0; r < r1; r++) {
        for (int64_t j = 0; j < T; j++) {  /* fp32 logits and each step's max */
            float m = -INFINITY, *dst = zf + j * N;
            if (bf16) { const uint16_t *src = (const uint16_t *)z_ + (r * T + j) * N;
                #pragma omp simd reduction(max:m)
                for (int64_t n = 0; n < N; n++) { float v = bf16_to_f32(src[n]); dst[n] = v; m = v > m ? v : m; } }
            else { const float *src = (const float *)z_ + (r * T + j) * N;
                #pragma omp simd reduction(max:m)
                for (int64_t n = 0; n < N; n++) { float v = src[n]; dst[n] = v; m = v > m ? v : m; } }
            mx[j] = m;
        }
        float mm = -INFINITY;
        #pragma omp simd reduction(max:mm)
        for (int64_t n = 0; n < N; n++) {
            float s = 0.0f;
            for (int64_t j = 0; j < T; j++) s += zf[j * N + n];
            zm[n] = s / (float)T;
            mm = zm[n] > mm ? zm[n] : mm;
        }
        /* the ensemble's CE; its logit gradient inv (softmax(zm) - one-hot) goes to every step */
        int64_t t = target[r];
        float s = 0.0f;
        #pragma omp simd reduction(+:s)
        for (int64_t n = 0; n < N; n++) { e[n] = exp_poly(zm[n] - mm); s += e[n]; }
        nll[r] = mm + logf(s) - zm[t];
        if (grad) {
            float sc = inv / s;
            #pragma omp simd
            for (int64_t n = 0; n < N; n++) q[n] = e[n] * sc;
            q[t] -= inv;
        }
        /* each step: p_j, E_pj[w_j] and p_j (w_j - E_pj[w_j]) = p_j w_j - p_j E_pj[w_j] */
        for (int64_t j = 0; j < T; j++) {
            const float *zj = zf + j * N;
            float mj = mx[j], sj = 0.0f;
            #pragma omp simd reduction(+:sj)
            for (int64_t n = 0; n < N; n++) { e[n] = exp_poly(zj[n] - mj); sj += e[n]; }
            float ij = 1.0f / sj, acc = 0.0f;
            #pragma omp simd reduction(+:acc)
            for (int64_t n = 0; n < N; n++) { float p = e[n] * ij, pw = p * (zj[n] - zm[n]); e[n] = p; g[n] = pw; acc += pw; }
            if (grad) store_grad(grad, (r * T + j) * N, g, e, acc, c, q, N, bf16);
            ew[r * T + j] = acc;
        }
    }
    free(buf);
    return 0;
}

int erl_rows(const void *z, const int64_t *target, void *grad, float *nll, float *ew,
             int64_t R, int64_t T, int64_t N, int bf16, float c, float inv, int threads) {
    int failed = 0;
    if (threads < 1) threads = 1;
    /* OpenMP: loaded into torch's process, this shares torch's own OpenMP runtime and threads
       (same soname), so no second pool spins against this one */
    #pragma omp parallel num_threads(threads) reduction(|:failed)
    {
        int nt = omp_get_num_threads(), id = omp_get_thread_num();
        failed |= run_rows(z, target, grad, nll, ew, R * id / nt, R * (id + 1) / nt, T, N, bf16, c, inv);
    }
    return failed;
}
"""

_FLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fPIC", "-shared"]
if platform.machine().lower() in ("x86_64", "amd64"):  # AVX-512 where there is some (gcc's default: 256 bits)
    _FLAGS.insert(2, "-mprefer-vector-width=512")
_lib: ctypes.CDLL | None = None
_tried = False


def _default_cache_dir() -> Path:
    root = os.environ.get("HARNESS_CACHE_DIR")
    return Path(root) if root else Path.home() / ".cache" / "harness"


def _cpu_id() -> str:
    """What a -march=native build depends on: the CPU's model and flags."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags"))][:2]
        return "".join(lines)
    except OSError:
        return platform.processor() + platform.machine()


def _build(cache_dir: Path) -> ctypes.CDLL:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        raise OSError("no C compiler (cc, gcc or clang) on PATH")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256("\0".join([SOURCE, " ".join(_FLAGS), version, _cpu_id()]).encode()).hexdigest()[:20]
    path = cache_dir / "kernels" / f"erl-{key}.so"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            src, out = Path(tmp) / "erl.c", Path(tmp) / "erl.so"
            src.write_text(SOURCE)
            done = subprocess.run([cc, *_FLAGS, "-o", str(out), str(src), "-lm"],
                                  capture_output=True, text=True)
            if done.returncode != 0:
                raise OSError(f"{cc} failed: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}")
            os.replace(out, path)  # atomic: concurrent builders each publish a whole file
    lib = ctypes.CDLL(str(path))
    lib.erl_rows.restype = ctypes.c_int
    lib.erl_rows.argtypes = ([ctypes.c_void_p] * 5 + [ctypes.c_int64] * 3 + [ctypes.c_int]
                             + [ctypes.c_float] * 2 + [ctypes.c_int])
    return lib


def erl_kernel(cache_dir: Path | None = None) -> ctypes.CDLL | None:
    """The built kernel (built under `cache_dir`, default $HARNESS_CACHE_DIR or ~/.cache/harness,
    on the process's first call), or None where it cannot be had (warned once)."""
    global _lib, _tried
    if _tried:
        return _lib
    _tried = True
    if os.environ.get("HARNESS_NATIVE", "1") == "0":
        return None
    try:
        _lib = _build(cache_dir or _default_cache_dir())
    except (OSError, subprocess.SubprocessError) as e:
        warnings.warn(f"ReaRec-ERL's fused CPU kernel is unavailable ({e}); using the slower eager path",
                      RuntimeWarning, stacklevel=2)
    return _lib


def erl_rows(z: torch.Tensor, target: torch.Tensor, nll: torch.Tensor, ew: torch.Tensor,
             grad: torch.Tensor | None = None, c: float = 1.0, inv: float = 1.0) -> None:
    """For CPU logits z (R, T, N), bf16 or fp32, and targets (R,) in [0, N): writes each row's
    ensemble NLL into nll (R,) and E_pj[w_j] into ew (R, T) (fp32), and, with `grad` (R, T, N)
    in z's dtype, the logit gradient c p_j (w_j - E_pj[w_j]) + inv (softmax(mean) - one-hot)
    of every step (see the module docstring). All contiguous. Requires `erl_kernel()` to have
    returned a library."""
    lib = erl_kernel()
    R, T, N = z.shape
    assert lib is not None and z.device.type == "cpu" and z.dtype in (torch.bfloat16, torch.float32)
    assert nll.shape == (R,) and ew.shape == (R, T) and nll.dtype == ew.dtype == torch.float32
    assert grad is None or (grad.shape == (R, T, N) and grad.dtype == z.dtype and grad.is_contiguous())
    assert nll.is_contiguous() and ew.is_contiguous()
    z, target = z.contiguous(), target.contiguous().to(torch.int64)
    if R and (int(target.min()) < 0 or int(target.max()) >= N):  # the kernel writes at the target
        raise IndexError(f"target out of range [0, {N})")
    failed = lib.erl_rows(z.data_ptr(), target.data_ptr(), None if grad is None else grad.data_ptr(),
                          nll.data_ptr(), ew.data_ptr(), R, T, N, int(z.dtype == torch.bfloat16), c, inv,
                          torch.get_num_threads())
    if failed:
        raise MemoryError("ReaRec-ERL's fused kernel could not allocate its row buffers")


def install(cache_dir: Path | None = None) -> bool:
    """Hand the kernel to `models.losses` where it can be built; whether it is in use."""
    from models import losses

    ok = erl_kernel(cache_dir) is not None
    losses.set_erl_kernel(erl_rows if ok else None)
    return ok
