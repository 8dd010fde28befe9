"""Our objectives inside other trainers (TRL's SFTTrainer, the HF Trainer).

    from dftune.interop import compute_loss_func
    trainer = SFTTrainer(model=..., args=SFTConfig(...), train_dataset=...,
                         compute_loss_func=compute_loss_func("dft"))

Those trainers compute the full logits themselves, so this path has their memory cost;
``token_loss`` (our own loop) avoids it. The loss is the sum of per-token objective
values divided by ``num_items_in_batch``, which the trainers pass as the number of
target tokens over all gradient-accumulation micro-batches, so accumulation is exact.
Objectives that need a reference model (iw_sft, asft, psft) are not available here;
``protect=`` needs the token classes (``token_class=dftune.vocab.token_classes(tok)``).
"""

from __future__ import annotations

import torch

from dftune.loss import IGNORE_INDEX, next_token_targets
from dftune.loss_chunked import topk_entropy
from dftune.objective_spec import get_objective
from dftune.objectives import TokenContext


def compute_loss_func(objective: str = "dft", token_class: torch.Tensor | None = None):
    """A ``compute_loss_func(outputs, labels, num_items_in_batch=None)`` for HF/TRL trainers.

    token_class: the (V,) class table, for objectives with ``protect=``.
    """
    obj = get_objective(objective)
    if obj.needs_ref:
        raise ValueError(f"{obj.name} needs a reference model: use dftune's own training loop")
    if obj.needs_classes and token_class is None:
        raise ValueError(f"{obj.name} needs token classes: compute_loss_func(..., token_class="
                         "dftune.vocab.token_classes(tokenizer, vocab_size=V))")
    if obj.normalize == "weights":
        raise ValueError(f"{obj.name}: norm=weight rescales the step's gradient in dftune's own loop; "
                         "the HF/TRL trainers divide by num_items_in_batch")

    def loss_fn(outputs, labels, num_items_in_batch=None):
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs.logits  # (B, T, V)
        b, t, v = logits.shape
        flat, shifted = next_token_targets(logits, labels)  # (B*(T-1), V), (B*(T-1),)
        mask = shifted != IGNORE_INDEX
        logsm = flat[mask].float().log_softmax(-1)  # fp32, valid rows only
        logp = logsm.gather(1, shifted[mask][:, None]).squeeze(1)
        seq_ids = torch.arange(b, device=labels.device).repeat_interleave(t - 1)[mask]
        topk = topk_entropy(logsm.detach(), min(obj.topk, v)) if obj.topk else None
        cls = None if token_class is None else token_class.to(labels.device)[shifted[mask]]
        vals = obj(logp, TokenContext(seq_ids=seq_ids, topk_entropy=topk, token_class=cls))
        denom = num_items_in_batch if num_items_in_batch is not None else mask.sum()
        if isinstance(denom, torch.Tensor):
            denom = denom.to(vals.device)
        return vals.sum() / denom

    return loss_fn
