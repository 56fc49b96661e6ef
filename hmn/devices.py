"""Where the heavy stages compute: the torch device of a stage, bfloat16 matmuls where they pay,
and the faiss install check.

Every stage has a device switch in its config section (``embed.use_gpu``, ``memory.use_gpu``,
``train.use_gpu``, ``eval.use_gpu``); the Ray layer asks Ray for the GPUs and hands the code
here the device it got. The core (`hmn.transe`, `hmn.kmeans`, `hmn.index`, `hmn.training`, the
readers) is device-agnostic torch: tensors are created on the device of their inputs. This
module imports torch only (no numpy), so ``benchmarks/gpu_check.py`` can report the device before
it knows whether numpy is installed.

bfloat16: a (B, N) or (b, C) similarity matmul rounded to bfloat16 inputs (float32
accumulation) runs on the tensor cores of a CUDA GPU; a CPU without AVX512-BF16 or AMX only
emulates it, slower than float32 (the 2-core CI machine: AVX2). `matmul_dtype` therefore grants
bfloat16 on CUDA only and logs once when a request is ignored.
"""

from __future__ import annotations

import functools
import logging
import os
import platform

import torch

logger = logging.getLogger(__name__)

__all__ = [
    "FAISS_DISTRIBUTIONS",
    "bf16_pays",
    "check_faiss_install",
    "cpu_threads",
    "device_name",
    "fits_on_device",
    "matmul_dtype",
    "resolve_device",
]

#: pip distributions that ship the ``faiss`` module; installing two of them breaks it (each
#: overwrites the other's files): the project's ``cpu`` and ``gpu`` extras are exclusive
FAISS_DISTRIBUTIONS = ("faiss-cpu", "faiss-gpu", "faiss-gpu-cu11", "faiss-gpu-cu12")

_told: set[tuple[str, str]] = set()


def cpu_threads(requested: int, local_workers: int = 1) -> int:
    """Torch threads for one of ``local_workers`` workers on this machine: ``requested``, but
    never more than the cores this process may run on shared among those workers, at least 1.

    An embedded local Ray counts at least 4 logical CPUs on a 2-core machine, so two workers of
    2 CPUs each fit its bookkeeping; with 2 torch threads each they would run 4 threads on 2
    cores, and torch's thread pool then spends its time waiting: a TransE bucket measured 2.3k
    triples/s with 2 threads against 27k with 1 on the 2-core machine.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(int(requested), (cores or 1) // max(1, int(local_workers))))


def resolve_device(device: str | torch.device | None = None, *, use_gpu: bool | None = None,
                   setting: str = "device") -> torch.device:
    """The torch device to compute on: ``device`` as given (``"cpu"``, ``"cuda"``,
    ``"cuda:1"``), or from a config switch (``use_gpu``: ``cuda`` when true, else ``cpu``).

    Raises RuntimeError naming ``setting`` when CUDA is asked for and torch sees no CUDA device
    here (a CPU-only torch wheel, no driver, or a Ray actor given no GPU).
    """
    if device is None:
        device = "cuda" if use_gpu else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"{setting}: CUDA asked for, but torch {torch.__version__} sees no "
                               f"CUDA device here (CPU-only wheel, no driver, or no GPU given "
                               f"to this process)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise RuntimeError(f"{setting}: {dev} asked for, but only "
                               f"{torch.cuda.device_count()} CUDA device(s) are visible")
    elif dev.type != "cpu":
        raise ValueError(f"{setting}: device {str(dev)!r}: must be 'cpu' or 'cuda'")
    return dev


def device_name(device: str | torch.device) -> str:
    """A readable name of ``device``: the GPU's model, or the CPU's processor string."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    try:
        with open("/proc/cpuinfo") as f:  # Linux: the "model name" line
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def bf16_pays(device: str | torch.device) -> bool:
    """Whether bfloat16 matmuls are native (faster than float32) on ``device``: CUDA with bf16
    support. CPUs are left out on purpose (see the module docstring)."""
    dev = torch.device(device)
    return dev.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def matmul_dtype(bf16: bool, device: str | torch.device, what: str) -> torch.dtype:
    """The dtype of ``what``'s similarity matmuls: bfloat16 when asked for (``bf16``) on a device
    where it pays (`bf16_pays`), else float32; a request that is ignored is logged once per
    (what, device type)."""
    if not bf16:
        return torch.float32
    dev = torch.device(device)
    if bf16_pays(dev):
        return torch.bfloat16
    key = (what, dev.type)
    if key not in _told:
        _told.add(key)
        logger.info("%s: bfloat16 matmuls asked for on %s, which has no native bfloat16 "
                    "(emulated it is slower than float32): float32 instead", what, dev)
    return torch.float32


def fits_on_device(nbytes: int, device: str | torch.device, share: float = 0.5) -> bool:
    """Whether ``nbytes`` take at most ``share`` of ``device``'s free memory (always true on the
    CPU, whose tensors need no copy): what decides between moving a table to the GPU whole and
    staging it block by block."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(dev)
    return nbytes <= share * free


@functools.lru_cache(maxsize=1)
def check_faiss_install() -> tuple[str, ...]:
    """The installed distributions that ship the ``faiss`` module. More than one is an error
    (RuntimeError naming them): they overwrite each other's files, and ``import faiss`` then
    fails or loads a mix. Install the project with one of its ``cpu`` or ``gpu`` extras."""
    from importlib import metadata

    found = []
    for name in FAISS_DISTRIBUTIONS:
        try:
            metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        found.append(name)
    if len(found) > 1:
        raise RuntimeError(f"{' and '.join(found)} are both installed; they ship the same "
                           f"'faiss' module and break it: uninstall them all, then install one "
                           f"(pip install -e '.[cpu]' or '.[gpu]')")
    return tuple(found)
