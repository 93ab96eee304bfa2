"""NVRTC compilation and launch of the CUDA C++ kernels (decode_cuda.py, gemm_wgmma.py).

Sources are compiled on first use with NVRTC (torch.cuda._compile_kernel: about a second per
template instance, no C++ toolchain) and launched through the driver's cuLaunchKernelEx on the
current stream (graph-capturable), with the programmatic dependent launch attribute when asked
(torch's own launcher sets no launch attributes; kernels/pdl.py has the rules).
"""

from __future__ import annotations

import ctypes
import functools

import torch

_MAX_DYNAMIC_SHARED = 8  # CUfunction_attribute CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES


@functools.cache
def _libcuda():
    return ctypes.CDLL("libcuda.so.1")


def available() -> bool:
    return hasattr(torch.cuda, "_compile_kernel")


@functools.cache
def kernel(sources: tuple[str, ...], name: str, arch: str | None = None, smem: int = 0):
    """Compile the concatenated source files as one unit and return kernel `name` (a template
    instance name is fine); arch e.g. "90a" (None: the current device's); smem: dynamic shared
    memory bytes the kernel may use beyond the default 48 KB."""
    src = []
    for path in sources:
        with open(path) as f:
            src.append(f.read())
    k = torch.cuda._compile_kernel("\n".join(src), name, compute_capability=arch, nvcc_options=["-std=c++17"])
    if smem > 48 * 1024:
        _check(_libcuda().cuFuncSetAttribute(k.func, _MAX_DYNAMIC_SHARED, smem), f"cuFuncSetAttribute({name})")
    return k


@functools.cache
def ctas_per_sm(k, threads: int, smem: int = 0) -> int:
    """Resident CTAs per SM of a compiled kernel (CUDA occupancy calculator; 1 if unavailable)."""
    try:
        n = ctypes.c_int()
        err = _libcuda().cuOccupancyMaxActiveBlocksPerMultiprocessor(ctypes.byref(n), k.func, threads,
                                                                     ctypes.c_size_t(smem))
        return max(1, n.value) if err == 0 else 1
    except (OSError, AttributeError):
        return 1


class _LaunchAttr(ctypes.Structure):  # CUlaunchAttribute: id, padding, a 64-byte value union
    _fields_ = [("id", ctypes.c_uint), ("pad", ctypes.c_uint), ("value", ctypes.c_uint * 16)]
    _PROGRAMMATIC_STREAM_SERIALIZATION = 6  # the CUlaunchAttributeID of PDL


class _LaunchConfig(ctypes.Structure):  # CUlaunchConfig
    _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3), ("smem", ctypes.c_uint),
                ("stream", ctypes.c_void_p), ("attrs", ctypes.POINTER(_LaunchAttr)), ("num_attrs", ctypes.c_uint)]


def _check(err: int, what: str) -> None:
    if err:
        msg = ctypes.c_char_p()
        _libcuda().cuGetErrorString(err, ctypes.byref(msg))
        raise RuntimeError(f"{what} failed: {(msg.value or b'').decode()} ({err})")


def launch(k, grid: tuple, block: int, args: list, use_pdl: bool, smem: int = 0) -> None:
    """Launch compiled kernel `k`; tensors are passed as pointers, ints as C ints."""
    vals = [ctypes.c_void_p(a.data_ptr()) if isinstance(a, torch.Tensor) else ctypes.c_int(a) for a in args]
    params = (ctypes.c_void_p * len(vals))(*[ctypes.addressof(v) for v in vals])
    attr = _LaunchAttr()
    attr.id, attr.value[0] = _LaunchAttr._PROGRAMMATIC_STREAM_SERIALIZATION, 1
    cfg = _LaunchConfig((ctypes.c_uint * 3)(*grid), (ctypes.c_uint * 3)(block, 1, 1), smem,
                        torch.cuda.current_stream().cuda_stream, ctypes.pointer(attr), int(use_pdl))
    _check(_libcuda().cuLaunchKernelEx(ctypes.byref(cfg), k.func, params, None), f"cuLaunchKernelEx(grid {grid})")
