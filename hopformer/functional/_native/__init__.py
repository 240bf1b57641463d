"""The fused C++ kernels of the sparse attention core, built at first use: `separation.cpp` (rows),
`supports.cpp` (products on the supports of long rows), `tiles.cpp` (short rows, transposed, 16 rows at a
time) and their shared `rows.h` and `vectors.h`.

The source is plain C++ (no torch headers), built once by any C++17 compiler (`$CXX`, else `c++`, `g++` or
`clang++` on the PATH): about 6 s with GCC at -O3 (the sources compile in parallel), for the machine's own
CPU (`$HOPFORMER_NATIVE_MARCH=<cpu>` builds for another, `-march=<cpu>`). The library is cached under
`$HOPFORMER_CACHE_DIR` (default `$XDG_CACHE_HOME/hopformer`, i.e. `~/.cache/hopformer`), keyed by the
source, the flags, the compiler and the CPU, and loaded with ctypes (whose calls release the GIL, so the
sparse kernels' worker threads run blocks in parallel). Without a compiler the torch-op kernels are used
and `error()` says why; `hopformer.functional.set_kernel_path("native")` makes that an error instead.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Optional

import torch

SOURCES = [Path(__file__).with_name(name) for name in ("separation.cpp", "supports.cpp", "tiles.cpp")]
HEADERS = [Path(__file__).with_name(name) for name in ("rows.h", "vectors.h")]
FLAGS = ["-O3", "-fopenmp-simd", "-ffp-contract=fast", "-std=c++17", "-shared", "-fPIC"]
# tried in order until one compiles: masked vector epilogues (GCC) help rows of 65 scores
ARCH_FLAGS = (["-march=native", "--param=vect-partial-vector-usage=1"], ["-march=native"], [])
KINDS = {"sparsemax": 0, "entmax": 1}
ABI_VERSION = 4

_LOCK = threading.Lock()
_LIB: Optional[ctypes.CDLL] = None
_ERROR: Optional[str] = None
_TRIED = False


def cache_dir() -> Path:
    """Where built libraries are kept (`$HOPFORMER_CACHE_DIR`, else `$XDG_CACHE_HOME/hopformer`)."""
    env = os.environ.get("HOPFORMER_CACHE_DIR", "").strip()
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME", "").strip() or str(Path.home() / ".cache")
    return Path(base) / "hopformer"


def _compiler() -> Optional[str]:
    env = os.environ.get("CXX", "").strip()
    if env:
        return env
    for name in ("c++", "g++", "clang++"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _cpu_key() -> str:
    """The CPU's feature flags (`-march=native` builds differ per CPU), else the processor name."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _arch_flags() -> tuple:
    """`ARCH_FLAGS`, or `-march=$HOPFORMER_NATIVE_MARCH` alone when that is set (e.g. x86-64-v2 for a CPU without
    FMA, haswell for AVX2: a portable library, or a check of the kernels on older instruction sets)."""
    march = os.environ.get("HOPFORMER_NATIVE_MARCH", "").strip()
    return ([f"-march={march}"],) if march else ARCH_FLAGS


def _run(cmds: list) -> Optional[str]:
    """Run the commands concurrently; None when all succeed, else what went wrong."""
    procs = []
    for cmd in cmds:
        try:
            procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
        except OSError as exc:
            for proc in procs:
                proc.kill()
                proc.communicate()
            return f"{' '.join(cmd)}: {exc}"
    problems = []
    for cmd, proc in zip(cmds, procs):
        try:
            _, err = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            problems.append(f"{' '.join(cmd)}: timed out")
            continue
        if proc.returncode != 0:
            problems.append(f"{' '.join(cmd)} exited with {proc.returncode}: {err.strip()[-2000:]}")
    return "; ".join(problems) or None


def _compile(cxx: str, target: Path) -> None:
    """Compile the sources into `target` (atomically: a temporary folder in the same folder, the library renamed
    into place). The sources compile in parallel, one process each (about 4 and 5 s with GCC at -O3), then link."""
    target.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    for arch in _arch_flags():
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            objects = [str(Path(tmp) / f"{src.stem}.o") for src in SOURCES]
            compile_flags = [f for f in FLAGS if f != "-shared"]
            message = _run([[cxx, *compile_flags, *arch, "-c", "-o", obj, str(src)]
                            for obj, src in zip(objects, SOURCES)])
            if message is None:
                library = str(Path(tmp) / target.name)
                message = _run([[cxx, *FLAGS, *arch, "-o", library, *objects]])
                if message is None:
                    os.replace(library, target)
                    return
        errors.append(message)
    raise RuntimeError("; ".join(errors))


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    ptr, i64, i32, f64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_double
    signatures = {  # every kernel returns an int status
        "forward": [ptr, ptr, i64, i64, i32, ptr, f64, f64, i32, ptr, ptr, ptr],
        "backward": [ptr, ptr, ptr, i64, i64, i32, ptr, f64, ptr, ptr, ptr, ptr],
        "forward_tiles": [ptr, i64, i64, i64, i32, ptr, f64, f64, i32, ptr, ptr, ptr],
        "backward_tiles": [ptr, ptr, ptr, i64, i64, i64, i32, ptr, f64, ptr, ptr, ptr, ptr],
        "readout_support": [ptr, ptr, ptr, i64, i64, i64, i64, i64, i64],
        "backward_support": [ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i64, i64, i64, i64, i32, ptr, f64,
                             ptr, ptr, ptr, ptr, f64, i64],
    }
    for name, argtypes in signatures.items():
        for suffix in ("f32", "f64"):
            fn = getattr(lib, f"hop_{name}_{suffix}")
            fn.argtypes, fn.restype = argtypes, i32
    lib.hop_abi_version.restype = i32
    if lib.hop_abi_version() != ABI_VERSION:
        raise RuntimeError(f"stale library: ABI {lib.hop_abi_version()}, expected {ABI_VERSION}")
    return lib


def load() -> Optional[ctypes.CDLL]:
    """The kernels' library, built on the first call (None, with `error()` set, when that fails)."""
    global _LIB, _ERROR, _TRIED
    if _TRIED:
        return _LIB
    with _LOCK:
        if _TRIED:
            return _LIB
        try:
            cxx = _compiler()
            if cxx is None:
                raise RuntimeError("no C++ compiler found (set $CXX, or install g++ or clang++)")
            version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
            key = hashlib.sha256(
                b"\0".join([*(f.read_bytes() for f in SOURCES + HEADERS), repr((FLAGS, _arch_flags())).encode(),
                            version.encode(), _cpu_key().encode()])
            ).hexdigest()[:16]
            target = cache_dir() / f"separation-{key}.so"
            if not target.exists():
                try:
                    _compile(cxx, target)
                except OSError:  # cache folder not writable (permissions, read-only file system): a temporary one
                    target = Path(tempfile.mkdtemp(prefix="hopformer-")) / target.name
                    _compile(cxx, target)
            _LIB = _declare(ctypes.CDLL(str(target)))
        except Exception as exc:  # any failure: the torch-op kernels take over
            _ERROR = f"{type(exc).__name__}: {exc}"
            _LIB = None
        _TRIED = True
        return _LIB


def error() -> Optional[str]:
    """Why the library could not be built or loaded (None when it was, or was not tried yet)."""
    return _ERROR


def _ptr(t: Optional[torch.Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


def _check(dtype: torch.dtype, *tensors: Optional[torch.Tensor]) -> str:
    for t in tensors:
        if t is not None and (t.dtype != dtype or not t.is_contiguous() or t.device.type != "cpu"):
            raise ValueError(f"native kernels need contiguous CPU {dtype} tensors; got {t.dtype} {tuple(t.shape)} "
                             f"contiguous={t.is_contiguous()} on {t.device}")
    if dtype == torch.float32:
        return "f32"
    if dtype == torch.float64:
        return "f64"
    raise ValueError(f"native kernels support float32 and float64; got {dtype}")


def forward(x: torch.Tensor, p: torch.Tensor, kind: str, alpha_rows: Optional[torch.Tensor], alpha: float, tol: float,
            max_iter: int, tau: torch.Tensor, shift: torch.Tensor, norm: torch.Tensor) -> None:
    """Weights `p` of the rows of `x` `(R, n)` (scores times alpha - 1) and, per row, `tau`, `shift`
    (the row maximum) and `norm` (see `separation.cpp`); `alpha_rows` `(R,)` or None (then `alpha`)."""
    lib = load()
    suffix = _check(x.dtype, x, p, alpha_rows, tau, shift, norm)
    rows, n = x.shape
    status = getattr(lib, f"hop_forward_{suffix}")(_ptr(x), _ptr(p), rows, n, KINDS[kind], _ptr(alpha_rows),
                                                   float(alpha), float(tol), int(max_iter), _ptr(tau), _ptr(shift),
                                                   _ptr(norm))
    if status != 0:
        raise ValueError("scores contain NaN or +inf: the separation maps need finite scores or -inf")


def backward(x: torch.Tensor, g: torch.Tensor, ds: torch.Tensor, kind: str, alpha_rows: Optional[torch.Tensor],
             alpha: float, tau: torch.Tensor, shift: torch.Tensor, norm: torch.Tensor,
             dalpha: Optional[torch.Tensor]) -> None:
    """From the recomputed scores `x` `(R, n)` (overwritten with the weights) and `g` = d loss / d p:
    `ds` = d loss / d x and, when `dalpha` `(R,)` is given, d loss / d alpha per row."""
    lib = load()
    suffix = _check(x.dtype, x, g, ds, alpha_rows, tau, shift, norm, dalpha)
    rows, n = x.shape
    getattr(lib, f"hop_backward_{suffix}")(_ptr(x), _ptr(g), _ptr(ds), rows, n, KINDS[kind], _ptr(alpha_rows),
                                           float(alpha), _ptr(tau), _ptr(shift), _ptr(norm), _ptr(dalpha))


def forward_tiles(xt: torch.Tensor, kind: str, alpha_rows: Optional[torch.Tensor], alpha: float, tol: float,
                  max_iter: int, tau: torch.Tensor, shift: torch.Tensor, norm: torch.Tensor) -> None:
    """`forward` on transposed rows: `xt` `(G, m, n)` holds entry j of row i of group g at `[g, j, i]` and is
    overwritten with the weights (same layout); per row (`g n + i`) `tau`, `shift`, `norm` (see `tiles.cpp`)."""
    lib = load()
    suffix = _check(xt.dtype, xt, alpha_rows, tau, shift, norm)
    groups, m, n = xt.shape
    status = getattr(lib, f"hop_forward_tiles_{suffix}")(_ptr(xt), groups, m, n, KINDS[kind], _ptr(alpha_rows),
                                                         float(alpha), float(tol), int(max_iter), _ptr(tau),
                                                         _ptr(shift), _ptr(norm))
    if status != 0:
        raise ValueError("scores contain NaN or +inf: the separation maps need finite scores or -inf")


def backward_tiles(xt: torch.Tensor, gt: torch.Tensor, dst: torch.Tensor, alpha_rows: Optional[torch.Tensor],
                   alpha: float, tau: Optional[torch.Tensor], shift: Optional[torch.Tensor],
                   norm: Optional[torch.Tensor], dalpha: Optional[torch.Tensor], kind: str = "entmax") -> None:
    """`backward` on transposed rows `(G, m, n)` (as `forward_tiles`): writes `dst` = d loss / d x and, when given,
    `dalpha` per row, from `gt` = d loss / d p and either the scores `xt` with the forward's `tau`, `shift`,
    `norm` (overwritten with the weights; the alpha-entmax formula for every map: alpha = 2 is sparsemax's, 1.5
    1.5-entmax's) or, with `tau`, `shift`, `norm` None, the weights `xt` the forward kept (read only; `kind`
    and alpha name the map)."""
    lib = load()
    suffix = _check(xt.dtype, xt, gt, dst, alpha_rows, tau, shift, norm, dalpha)
    groups, m, n = xt.shape
    getattr(lib, f"hop_backward_tiles_{suffix}")(_ptr(xt), _ptr(gt), _ptr(dst), groups, m, n, KINDS[kind],
                                                 _ptr(alpha_rows), float(alpha), _ptr(tau), _ptr(shift), _ptr(norm),
                                                 _ptr(dalpha))


def _check_rows(dtype: torch.dtype, *tensors: torch.Tensor) -> None:
    """`(groups, rows, width)` CPU tensors of `dtype` whose rows are contiguous (the groups may lie apart)."""
    for t in tensors:
        if t.dtype != dtype or t.device.type != "cpu" or t.dim() != 3 or t.stride(2) != 1 or t.stride(1) != t.shape[2]:
            raise ValueError(f"native kernels need (groups, rows, width) CPU {dtype} tensors with contiguous rows; got "
                             f"{t.dtype} {tuple(t.shape)} strides {t.stride()} on {t.device}")


def readout_support(p: torch.Tensor, v: torch.Tensor, out: torch.Tensor, limit: int) -> bool:
    """`out = p v` on the rows' supports, for weights `p` `(G, R, m)` and `v` `(G, m, dv)` (contiguous) into `out`
    `(G, R, dv)` (rows contiguous); False, with nothing written, when the weights hold more than `limit` nonzeros."""
    lib = load()
    suffix = _check(p.dtype, p, v)
    _check_rows(p.dtype, out)
    groups, rows, m = p.shape
    status = getattr(lib, f"hop_readout_support_{suffix}")(_ptr(p), _ptr(v), _ptr(out), groups, rows, m, v.shape[2],
                                                           out.stride(0), int(limit))
    return status == 0


def backward_support(x: torch.Tensor, go: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, kind: str,
                     alpha_rows: Optional[torch.Tensor], alpha: float, tau: torch.Tensor, shift: torch.Tensor,
                     norm: torch.Tensor, dalpha: Optional[torch.Tensor], grad_scale: float, limit: int) -> bool:
    """`backward` and the block's products on the rows' supports: from the recomputed scores `x` `(G, R, m)` (read
    only), the read-out's gradient `go` `(G, R, dv)` and the queries `q` `(G, R, d)` (rows contiguous), with keys
    `k` `(G, m, d)` and values `v` `(G, m, dv)`: writes `dq = grad_scale ds k` `(G, R, d)` (rows contiguous) and
    `dalpha` (when given), adds `grad_scale ds^T q` to `dk` and `p^T go` to `dv`. False, with nothing written, when
    the supports hold more than `limit` entries."""
    lib = load()
    suffix = _check(x.dtype, x, k, v, dk, dv, alpha_rows, tau, shift, norm, dalpha)
    _check_rows(x.dtype, go, q, dq)
    if q.stride(0) != dq.stride(0):
        raise ValueError(f"q and dq need the same group stride; got {q.stride(0)} and {dq.stride(0)}")
    groups, rows, m = x.shape
    status = getattr(lib, f"hop_backward_support_{suffix}")(
        _ptr(x), _ptr(go), _ptr(q), _ptr(k), _ptr(v), _ptr(dq), _ptr(dk), _ptr(dv), groups, rows, m, k.shape[2],
        v.shape[2], go.stride(0), q.stride(0), KINDS[kind], _ptr(alpha_rows), float(alpha), _ptr(tau), _ptr(shift),
        _ptr(norm), _ptr(dalpha), float(grad_scale), int(limit))
    return status == 0
