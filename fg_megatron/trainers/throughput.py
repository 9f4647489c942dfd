"""Achieved TFLOP/s and MFU of a step, from the step's model FLOPs (:mod:`fg_megatron.models.flops`).

    tflops = step FLOPs (all ranks together) / step seconds / world size / 1e12   (per GPU)
    mfu    = tflops / peak TFLOP/s of one GPU

The peak is ``train.peak_tflops`` when set, else this table's dense (no 2:4 sparsity) peak
of the GPU ``torch.cuda.get_device_name()`` names, from NVIDIA's data sheets: bf16/fp16
tensor cores for a bf16/fp16 model; for fp32, the TF32 tensor-core peak when PyTorch lets
fp32 matmuls use TF32 (``torch.backends.cuda.matmul.allow_tf32``), else the plain FP32 peak
(PyTorch's default).  None (no ``mfu``) on CPU or an unlisted GPU.
"""

from __future__ import annotations

from typing import Optional

import torch

# name fragment -> (bf16/fp16, tf32, fp32) dense TFLOP/s; the first fragment found in the device
# name wins (H100 PCIe before H100 SXM's "H100"); None: the variant is not listed.
PEAK_TFLOPS: tuple[tuple[str, Optional[tuple[float, float, float]]], ...] = (
    ("H100 PCIe", (756.0, 378.0, 51.0)),
    ("H100 NVL", None),
    ("H100", (989.0, 494.7, 66.9)),  # SXM5 (device name "NVIDIA H100 80GB HBM3")
    ("H200", (989.0, 494.7, 66.9)),
    ("A100", (312.0, 156.0, 19.5)),
    ("L40S", (362.0, 183.0, 91.6)),
    ("V100", (125.0, 15.7, 15.7)),  # fp16 tensor cores; no bf16 or TF32
)


def device_peak_tflops(dtype: torch.dtype, device_name: Optional[str] = None) -> Optional[float]:
    """Dense peak TFLOP/s of this process's GPU for a model in ``dtype`` (None: unknown / CPU)."""
    if device_name is None:
        if not torch.cuda.is_available():
            return None
        device_name = torch.cuda.get_device_name()
    for fragment, peaks in PEAK_TFLOPS:
        if fragment in device_name:
            if peaks is None:
                return None
            half, tf32, fp32 = peaks
            if dtype in (torch.bfloat16, torch.float16):
                return half
            return tf32 if torch.backends.cuda.matmul.allow_tf32 else fp32
    return None


def throughput_metrics(flops: Optional[float], seconds: float, world_size: int,
                       peak_tflops: Optional[float]) -> dict[str, float]:
    """``tflops`` (per rank) and, given a peak, ``mfu``; nothing when the task reports no FLOPs."""
    if flops is None:
        return {}
    tflops = flops / max(seconds, 1e-9) / world_size / 1e12
    out = {"tflops": tflops}
    if peak_tflops:
        out["mfu"] = tflops / peak_tflops
    return out
