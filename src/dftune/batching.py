"""Optimizer steps from tokenised examples: which examples, on which process, padded or packed.

Each optimizer step takes ``global_batch`` examples from a seeded shuffle of the epoch, a
pure function of (seed, epoch): the same examples with or without packing and on any
number of processes, so the step's gradient and its global token count do not depend on
the layout, and resuming only needs the step number.

Padded (default): the step's examples are sorted by length, dealt round-robin to the
processes and cut into micro-batches of ``micro_batch`` sequences, so similar lengths share
a padded micro-batch.

Packed (``data.packing``): the step's examples are packed into rows of at most
``max_length`` tokens (best-fit decreasing); ``position_ids`` restart at 0 for every
example, from which transformers keeps attention inside each example (a block-diagonal
mask for sdpa/eager/flex; varlen ``cu_seqlens`` for flash-attention, which
``dftune.model`` passes), and the label of each example's first token is ignored, so no
token is predicted across a boundary. Rows are dealt to processes and cut into
micro-batches of at most ``micro_batch`` rows; every process runs the same number of
micro-batches (one without rows runs a one-token row that carries no loss), as DDP and
FSDP's collectives require. Same examples, same per-token losses, same divisor: the
step's gradient equals the padded one up to float rounding.
"""

from __future__ import annotations

import random
from bisect import bisect_left, insort
from dataclasses import dataclass

import numpy as np
import torch

IGNORE_INDEX = -100


@dataclass
class Step:
    """One optimizer step: ``rows[rank][micro]`` = rows, each a list of example indices
    (a single example per row unless ``packed``)."""

    rows: list
    packed: bool = False


def _order(n_examples: int, seed: int, epoch: int) -> list[int]:
    order = list(range(n_examples))
    random.Random(f"{seed}-{epoch}").shuffle(order)
    return order


def plan_epoch(n_examples: int, global_batch: int, world: int, micro: int, seed: int, epoch: int,
               lengths) -> list[list[list[list[int]]]]:
    """plan[step][rank][micro] = example indices. Deterministic in (seed, epoch).

    The last incomplete global batch is dropped (every step has the same size).
    """
    if global_batch % (micro * world):
        raise ValueError(f"global_batch {global_batch} must be a multiple of micro_batch x processes = {micro * world}")
    order = _order(n_examples, seed, epoch)
    steps = []
    for s in range(n_examples // global_batch):
        batch = sorted(order[s * global_batch:(s + 1) * global_batch], key=lambda i: (-lengths[i], i))
        per_rank = [batch[r::world] for r in range(world)]  # dealt round-robin: balanced lengths
        steps.append([[rank[j:j + micro] for j in range(0, len(rank), micro)] for rank in per_rank])
    return steps


def pack(lengths, capacity: int) -> list[list[int]]:
    """Best-fit decreasing: indices into ``lengths`` grouped into rows of at most ``capacity``
    tokens; longest first (ties by index), each into the fullest row it fits. Deterministic."""
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (space left, row), sorted
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        n = int(lengths[i])
        if n > capacity:
            raise ValueError(f"an example of {n} tokens does not fit a row of {capacity}")
        k = bisect_left(free, (n, -1))  # the row with the least space that still fits
        if k == len(free):
            rows.append([i])
            insort(free, (capacity - n, len(rows) - 1))
        else:
            space, r = free.pop(k)
            rows[r].append(i)
            insort(free, (space - n, r))
    return rows


def _split(items: list, parts: int) -> list[list]:
    """``parts`` consecutive groups whose sizes differ by at most one (some may be empty)."""
    q, rem = divmod(len(items), parts)
    out, a = [], 0
    for j in range(parts):
        b = a + q + (j < rem)
        out.append(items[a:b])
        a = b
    return out


def plan_packed_epoch(n_examples: int, global_batch: int, world: int, micro: int, seed: int, epoch: int, lengths,
                      capacity: int) -> list[list[list[list[list[int]]]]]:
    """plan[step][rank][micro] = rows of example indices: each step's examples (the same as
    ``plan_epoch``'s) packed into rows of at most ``capacity`` tokens."""
    if global_batch % (micro * world):
        raise ValueError(f"global_batch {global_batch} must be a multiple of micro_batch x processes = {micro * world}")
    order = _order(n_examples, seed, epoch)
    steps = []
    for s in range(n_examples // global_batch):
        batch = order[s * global_batch:(s + 1) * global_batch]
        rows = [[batch[j] for j in row] for row in pack([lengths[i] for i in batch], capacity)]
        rows.sort(key=lambda row: (-sum(int(lengths[i]) for i in row), row[0]))  # fullest first
        per_rank = [rows[r::world] for r in range(world)]
        n_micro = max(1, -(-max(len(p) for p in per_rank) // micro))  # the same on every process
        steps.append([_split(p, n_micro) for p in per_rank])
    return steps


def epoch_steps(data, global_batch: int, world: int, micro: int, seed: int, epoch: int, cfg) -> list[Step]:
    """The steps of ``epoch`` over ``data`` (``TokenizedData``), padded or packed per ``cfg``
    (``DataConfig``: ``packing``, ``max_length``)."""
    lengths = data.lengths
    if cfg.packing:
        plan = plan_packed_epoch(len(data), global_batch, world, micro, seed, epoch, lengths, cfg.max_length)
        return [Step(step, packed=True) for step in plan]
    plan = plan_epoch(len(data), global_batch, world, micro, seed, epoch, lengths)
    return [Step([[[[i] for i in mb] for mb in rank] for rank in step]) for step in plan]


def step_batches(data, step: Step, rank: int, pad_id: int) -> tuple[list[dict[str, torch.Tensor]], int]:
    """This process's micro-batches of ``step`` as (B, T) tensors, and the step's count of
    target tokens over every process (from the data itself: exact, no communication)."""
    every = [i for per_rank in step.rows for mb in per_rank for row in mb for i in row]
    count = int(data.targets[np.asarray(every, dtype=np.int64)].sum()) if every else 0
    make = collate_packed if step.packed else collate_rows
    return [make(data, mb, pad_id) for mb in step.rows[rank]], count


def _tensors(ids, labels, mask, pos=None) -> dict[str, torch.Tensor]:
    out = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask), "labels": torch.from_numpy(labels)}
    if pos is not None:
        out["position_ids"] = torch.from_numpy(pos)
    return out


def collate_rows(data, rows: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded (B, T) input_ids, attention_mask and labels (-100 on prompt and padding),
    one example per row."""
    idx = [row[0] for row in rows]
    width = max(int(data.lengths[i]) for i in idx)
    ids = np.full((len(idx), width), pad_id, dtype=np.int64)
    labels = np.full((len(idx), width), IGNORE_INDEX, dtype=np.int64)
    mask = np.zeros((len(idx), width), dtype=np.int64)
    for r, i in enumerate(idx):
        tok, loss = data.tokens(i)
        n = len(tok)
        ids[r, :n] = tok
        labels[r, :n] = np.where(loss.astype(bool), tok, IGNORE_INDEX)
        mask[r, :n] = 1
    return _tensors(ids, labels, mask)


def collate_packed(data, rows: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """(B, T) rows of several examples each, with position_ids restarting at 0 per example
    (and for the trailing padding, its own segment); attention_mask marks real tokens, for
    counting only: the model is called without it (``dftune.model``)."""
    rows = rows or [[]]  # a process without rows this micro-batch: one pad token, no loss
    width = max(1, max(sum(int(data.lengths[i]) for i in row) for row in rows))
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    labels = np.full((len(rows), width), IGNORE_INDEX, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    pos = np.zeros((len(rows), width), dtype=np.int64)
    for r, row in enumerate(rows):
        a = 0
        for i in row:
            tok, loss = data.tokens(i)
            n = len(tok)
            ids[r, a:a + n] = tok
            labels[r, a:a + n] = np.where(loss.astype(bool), tok, IGNORE_INDEX)
            labels[r, a] = IGNORE_INDEX  # nothing in this example predicts its first token
            mask[r, a:a + n] = 1
            pos[r, a:a + n] = np.arange(n)
            a += n
        pos[r, a:] = np.arange(width - a)
    return _tensors(ids, labels, mask, pos)


def collate(examples, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded (B, T) input_ids, attention_mask and labels (-100 on padding) from
    ``Example`` objects (analysis and tests; training uses ``step_batches``)."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
