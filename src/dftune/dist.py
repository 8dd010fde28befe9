"""Processes, parallelism and checkpoints: plain torch.distributed, no trainer framework.

    dftune train CONFIG                                                        # one process
    torchrun --nproc_per_node 8 -m dftune.cli train CONFIG                     # DDP
    torchrun --nproc_per_node 8 -m dftune.cli train CONFIG train.parallel=fsdp # FSDP2

Any launcher that sets RANK / WORLD_SIZE / LOCAL_RANK (torchrun, ``accelerate launch``,
SLURM through torchrun) works; NCCL on GPUs, gloo on CPUs (the test suite runs DDP and
FSDP2 with 2 gloo processes).

Parallel modes:
- ``ddp``: every process holds the model; gradients are averaged after each step's last
  micro-batch (``no_sync`` before). FSDP2 reduce-scatters after every micro-batch instead
  (``grad_sync``), so that no process holds unsharded gradients between them.
- ``fsdp``: FSDP2 (``fully_shard``) on every decoder layer, then on the root, which holds
  the embeddings, final norm and LM head: the root's parameters stay gathered from its
  forward to its backward, which is where ``token_loss`` reads the head. With
  ``bf16-mixed`` the parameters are gathered in bf16 and gradients reduced in fp32
  (``MixedPrecisionPolicy``), the paper's setting; the sharded fp32 parameters are the
  master weights the optimizer updates. A frozen reference model (``model.Reference``) is
  sharded the same way, as a root of its own, stored in bf16 under ``bf16-mixed`` (the
  precision the policy computes in, so step-1 KL is exactly 0), and released after each
  forward.

Checkpoints are ``torch.distributed.checkpoint`` folders (each process writes its own
shards, so FSDP never gathers the model to save it) plus each process's RNG state and a
``state.json`` written last. Nothing in a checkpoint is unpickled as code: DCP's own loader
unpickles the ``.metadata`` file with plain ``pickle`` and every non-tensor item (AdamW's
``lr``, ``betas``, ...) with ``torch.load(weights_only=False)``; dftune reads the first
through an allow-list of DCP's metadata classes (``_safe_reader``) and the second with
``weights_only=True`` (``_SafeLoadPlanner``), and the RNG files with ``weights_only=True``.
A file that asks for anything else stops the resume with ``UnsafeCheckpointError``.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from dftune.errors import UserError
from dftune.settings import ConfigError

_QUIET = dict(action="ignore", message="torch.distributed is disabled")  # DCP in one process is intended

PARALLEL = ("auto", "none", "ddp", "fsdp")
_STEP_DIR = re.compile(r"^step_(\d+)$")


@dataclass
class Runtime:
    """This process's place: rank, world size, device; ``owns_group`` if we started it."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over processes, in place (returned for chaining)."""
        if self.world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


def init_runtime() -> Runtime:
    """Read the launcher's environment; join the process group when there are several."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    owns = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
        owns = True
    return Runtime(rank=rank, world=world, local_rank=local, device=device, owns_group=owns)


def resolve_parallel(mode: str, world: int) -> str:
    if mode not in PARALLEL:
        raise ConfigError(f"train.parallel must be one of {PARALLEL}; got {mode!r}")
    if mode == "auto":
        return "ddp" if world > 1 else "none"
    if mode == "ddp" and world == 1:
        return "none"
    if mode == "fsdp" and world == 1 and "RANK" not in os.environ:
        return "none"  # one process not launched by torchrun: nothing to shard over
    return mode


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated decoder blocks (FSDP's units): the decoder's ``layers`` list, else the
    modules whose class the model declares unsplittable (``_no_split_modules``)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if isinstance(layers, nn.ModuleList) and len(layers):
        return list(layers)
    names = set(getattr(base, "_no_split_modules", None) or [])
    found = [m for m in base.modules() if type(m).__name__ in names]
    if not found:
        raise ConfigError(f"{type(base).__name__}: cannot find its decoder layers to shard with FSDP")
    return found


def parallelize(module: nn.Module, model: nn.Module, rt: Runtime, mode: str, mixed_bf16: bool) -> nn.Module:
    """Wrap ``module`` (whose forward runs ``model``) for ``mode``: none, ddp or fsdp."""
    if mode == "none":
        return module
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(module, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_bf16 else MixedPrecisionPolicy()
    for layer in decoder_layers(model):
        fully_shard(layer, mp_policy=mp)
    fully_shard(module, mp_policy=mp)
    # the frozen reference (iw_sft, asft, psft, KL logging): sharded the same way, a root of its
    # own, gathered in the policy's precision, so its step-1 log-probs equal the policy's
    for ref in getattr(module, "_ref", []):
        for layer in decoder_layers(ref.model):
            fully_shard(layer, mp_policy=mp)
        fully_shard(ref, mp_policy=mp)
    return module


@contextmanager
def gathered_root(module: nn.Module):
    """FSDP2: the root's parameters (embeddings, final norm, LM head) gathered for a use of the
    model outside the root's forward (generation); the decoder layers gather themselves in
    their own forward. Elsewhere nothing to do."""
    if not hasattr(module, "unshard"):
        yield
        return
    module.unshard()
    try:
        yield
    finally:
        module.reshard()


def unwrap(module: nn.Module) -> nn.Module:
    """The module under a DDP wrapper (FSDP2 wraps in place: it is the module itself)."""
    return getattr(module, "module", module) if type(module).__name__ == "DistributedDataParallel" else module


@contextmanager
def grad_sync(module: nn.Module, enabled: bool):
    """DDP: gradient reduction on (the step's last micro-batch) or off (the others).

    FSDP2 reduces on every micro-batch: without reduction it would keep each parameter's
    whole (unsharded) gradient until the last one, upcast to fp32 under bf16-mixed: 4 bytes x
    every parameter on every GPU (28 GiB at 7B), where reducing leaves 4 / world. The sharded
    fp32 gradients accumulate across micro-batches; the extra reduce-scatters overlap with
    the backward (docs/design.md, memory per GPU)."""
    if enabled or not hasattr(module, "no_sync"):  # FSDP2 has no no_sync: it always reduces
        yield
    else:
        with module.no_sync():
            yield


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> float:
    """Global gradient norm (over every shard), clipped to ``max_norm`` (<= 0: no clipping)."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor
        norm = norm.full_tensor()
    return float(norm)


# ---- checkpoints -----------------------------------------------------------------------------


def checkpoints(run: Path) -> list[Path]:
    """Complete checkpoints of a run folder, oldest first (``step_N`` with a state.json)."""
    folder = Path(run) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir()
             if (m := _STEP_DIR.match(p.name)) and (p / "state.json").is_file()]
    return [p for _, p in sorted(found)]


def _rng_state() -> dict:
    py = random.getstate()
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "python": [py[0], list(py[1]), py[2]]}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))


def save_checkpoint(rt: Runtime, module: nn.Module, opt, run: Path, step: int, keep: int, extra: dict) -> Path:
    """Write ``checkpoints/step_N`` atomically: every process writes into ``step_N.tmp``,
    all wait, then the main process adds state.json, renames, and prunes old ones."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    final = Path(run) / "checkpoints" / f"step_{step:07d}"
    tmp = final.with_name(final.name + ".tmp")
    if rt.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    rt.barrier()  # nobody writes into a folder the main process is still clearing
    model_sd, optim_sd = get_state_dict(module, opt)
    with warnings.catch_warnings():
        warnings.filterwarnings(**_QUIET)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    torch.save(_rng_state(), tmp / f"rng_{rt.rank}.pt")
    rt.barrier()  # every shard and RNG file is on disk before the folder becomes visible
    if rt.is_main:
        (tmp / "state.json").write_text(json.dumps({"step": step, "world": rt.world, **extra}))
        if final.exists():  # the same step saved again (a finished run resumed)
            shutil.rmtree(final)
        tmp.rename(final)
        for old in checkpoints(run)[:-keep]:
            shutil.rmtree(old)
    rt.barrier()
    return final


# What a DCP metadata file may contain. DCP unpickles it with plain pickle.load, which runs
# whatever a file from elsewhere asks; we unpickle it ourselves against this allow-list.
_METADATA_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "MetadataIndex", "TensorStorageMetadata", "StorageMeta",
                                              "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
                                              "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath", "Path"},
    "collections": {"OrderedDict"},
}


class UnsafeCheckpointError(UserError, ValueError):
    """A checkpoint file asks to build something other than checkpoint metadata."""


def _safe_planner():
    """DCP's default load planner, except that non-tensor items are read with
    ``weights_only=True`` (plain numbers, strings, tuples, lists, dicts, tensors)."""
    import pickle

    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint._traverse import set_element  # what DefaultLoadPlanner.load_bytes uses

    class SafeLoadPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value):
            fqn = read_item.dest_index.fqn
            try:
                obj = torch.load(value, weights_only=True)
            except pickle.UnpicklingError as e:
                raise UnsafeCheckpointError(f"checkpoint item {fqn!r} is not plain data ({str(e).splitlines()[0]}); "
                                            "refusing to load it") from None
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[fqn], obj)
            else:
                self.state_dict[fqn] = obj

    return SafeLoadPlanner()


def _safe_reader(folder: Path):
    import pickle

    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            if name in _METADATA_GLOBALS.get(module, ()) or (module == "torch" and isinstance(getattr(torch, name, None),
                                                                                             torch.dtype)):
                return super().find_class(module, name)
            raise UnsafeCheckpointError(f"{folder}/.metadata refers to {module}.{name}, which is not checkpoint "
                                        "metadata; refusing to load it")

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            rank = kwargs.get("rank")
            name = ".metadata" if rank is None else f"__{rank}.metadata"
            with open(Path(self.path) / name, "rb") as f:
                metadata = Unpickler(f).load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(str(folder))


def load_checkpoint(rt: Runtime, module: nn.Module, opt, folder: Path) -> dict:
    """Restore weights, optimizer and this process's RNG from ``folder``; return state.json."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    state = json.loads((folder / "state.json").read_text())
    if state.get("world", rt.world) != rt.world:
        raise ConfigError(f"{folder} was written by {state['world']} processes; resume it with the same number "
                         f"(now {rt.world}): the data order per process depends on it")
    reader = _safe_reader(folder)
    reader.read_metadata()  # refuse a foreign .metadata here, with our error, before DCP wraps it
    model_sd, optim_sd = get_state_dict(module, opt)
    sd = {"model": model_sd, "optim": optim_sd}
    with warnings.catch_warnings():
        warnings.filterwarnings(**_QUIET)
        try:
            dcp.load(sd, storage_reader=reader, planner=_safe_planner())
        except CheckpointException as e:  # DCP gathers every process's failure into one
            unsafe = [exc for exc, _ in e.failures.values() if isinstance(exc, UnsafeCheckpointError)]
            if unsafe:
                raise unsafe[0] from None
            raise
    set_state_dict(module, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    rng = folder / f"rng_{rt.rank}.pt"
    if rng.is_file():
        _set_rng_state(torch.load(rng, weights_only=True))
    return state


def full_state_dict(rt: Runtime, module: nn.Module) -> dict | None:
    """The whole model's state on CPU, on the main process (gathered from FSDP shards)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
    )

    sd = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return sd if rt.is_main else None
