"""Precision, decided once: a setting's name becomes a ``Precision`` object at the start of a
run, and nothing later compares precision strings (nanochat's ``autocast_ctx``).

Training (``train.precision``): ``bf16-mixed`` keeps fp32 master weights and optimizer state
and computes in bf16 (autocast; under FSDP the ``MixedPrecisionPolicy`` gathers bf16
parameters and reduces fp32 gradients instead), the paper's setting and the default on GPUs;
``fp32``; ``bf16-pure`` stores the weights in bf16 and loses updates smaller than bf16's
resolution (0.02 + 5e-5 == 0.02), offered only for memory-starved runs. fp16 is refused here,
and only here: it needs loss scaling (the LM-head gradient underflows at realistic token
counts), which dftune does not do.

Inference (evaluation, analysis, sampling, the TRL baselines): ``dtype`` names (``auto``,
``bf16``/``bfloat16``, ``fp16``/``float16``, ``fp32``/``float32``) through the one map ``DTYPES``.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

PRECISIONS = ("auto", "bf16-mixed", "fp32", "bf16-pure")
FP16_REFUSED = ("fp16 is not supported: fp16 gradients underflow without loss scaling, which dftune does not do; "
                "use bf16-mixed (GPUs since Ampere) or fp32")

# every dtype name a setting may use -> the torch dtype; "auto" is decided by the device (inference_dtype)
DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}


def precision_problem(name: str) -> str | None:
    """What is wrong with a ``train.precision`` value, or None."""
    if name.startswith("fp16"):
        return f"train.precision: {FP16_REFUSED}"
    if name not in PRECISIONS:
        return f"train.precision: must be one of {', '.join(PRECISIONS)}; got {name!r}"
    return None


def inference_dtype(device: torch.device | str) -> torch.dtype:
    """``auto`` for evaluation and analysis: bf16 on CUDA, fp32 on CPU."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def torch_dtype(name: str, device: torch.device | str = "cpu") -> torch.dtype:
    """A dtype setting (auto, bf16, fp32, bfloat16, ...) as a torch dtype on ``device``."""
    return inference_dtype(device) if name == "auto" else DTYPES[name]


@dataclass(frozen=True)
class Precision:
    """A training run's precision: how the weights are stored, how compute is cast, and who
    casts it (autocast, or FSDP's mixed-precision policy)."""

    name: str  # bf16-mixed | fp32 | bf16-pure ("auto" resolved)
    device_type: str
    fsdp: bool = False

    @classmethod
    def resolve(cls, name: str, device: torch.device, parallel: str = "none") -> Precision:
        """``auto``: bf16-mixed on CUDA, fp32 on CPU. ``name`` was validated (precision_problem)."""
        if name == "auto":
            name = "bf16-mixed" if device.type == "cuda" else "fp32"
        return cls(name, device.type, parallel == "fsdp")

    @property
    def weights(self) -> torch.dtype:
        """The dtype the weights (and so the optimizer state) are kept in."""
        return torch.bfloat16 if self.name == "bf16-pure" else torch.float32

    @property
    def mixed(self) -> bool:
        """bf16 compute over fp32 weights (FSDP: its MixedPrecisionPolicy does the cast)."""
        return self.name == "bf16-mixed"

    @property
    def reference(self) -> torch.dtype | None:
        """The dtype of a frozen reference model's copy (iw_sft, asft, psft): bf16 under FSDP
        with bf16-mixed, whose policy computes with bf16 copies of the master weights (the same
        numbers at half the memory, sharded); else None, the weights' own (read under the same
        autocast as the model)."""
        return torch.bfloat16 if self.mixed and self.fsdp else None

    def autocast(self):
        """The context the training forward runs in: autocast for bf16-mixed, except under
        FSDP, whose MixedPrecisionPolicy computes in bf16 itself."""
        if self.mixed and not self.fsdp:
            return torch.autocast(self.device_type, dtype=torch.bfloat16)
        return nullcontext()

    def eval_autocast(self):
        """The context generation on the live (unwrapped) model runs in."""
        return torch.autocast(self.device_type, dtype=torch.bfloat16) if self.mixed else nullcontext()
