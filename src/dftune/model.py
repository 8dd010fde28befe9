"""Loading causal LMs and computing the loss from their final hidden states.

Any ``AutoModelForCausalLM`` works (Hub id, local folder, or a GGUF file through
transformers). The LM head is never applied to the whole sequence: ``CausalLMLoss`` runs
the decoder to get the final hidden states and hands them, with the head's weight, to
``token_loss``, which works through the vocabulary in chunks.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
from torch import nn

from dftune.config import ModelConfig
from dftune.loss import LossResult, next_token_targets, token_loss
from dftune.objectives import Objective
from dftune.progress import main_process, step
from dftune.settings import ConfigError


def load_tokenizer(name_or_path: str | ModelConfig, *, gguf_file: str = "", trust_remote_code: bool = False):
    """The tokenizer, with a pad token (EOS if it has none: padding is masked anyway)."""
    from transformers import AutoTokenizer

    if isinstance(name_or_path, ModelConfig):
        gguf_file, trust_remote_code, name_or_path = (name_or_path.gguf_file, name_or_path.trust_remote_code,
                                                      name_or_path.name_or_path)
    if not name_or_path:
        raise ConfigError("model.name_or_path is empty: give a Hub id or a local model folder")
    kw = {"gguf_file": gguf_file} if gguf_file else {}
    if not Path(name_or_path).expanduser().is_dir() and main_process():
        print(f"model: {name_or_path} is not a folder here: fetching it from the Hugging Face Hub (once, then cached)",
              file=sys.stderr, flush=True)
    try:
        tok = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, **kw)
    except OSError as e:  # not a folder here, and not a model the Hub has (or the Hub is out of reach)
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{name_or_path}: not a model folder here, and not loadable from the Hub ({why})") from None
    if tok.eos_token_id is None:
        raise ConfigError(f"{name_or_path}: the tokenizer has no EOS token; responses must end with one")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_pretrained(name_or_path: str, *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                    gguf_file: str = "", trust_remote_code: bool = False, attn_implementation: str = ""):
    """A causal LM in ``dtype`` on ``device`` (GGUF files dequantised and made saveable)."""
    from transformers import AutoModelForCausalLM

    kw = {"gguf_file": gguf_file} if gguf_file else {}
    if attn_implementation:
        kw["attn_implementation"] = attn_implementation
    where = "" if Path(name_or_path).expanduser().is_dir() else " from the Hugging Face Hub (downloaded once, then cached)"
    with step(f"model: loading {name_or_path}{where} in {str(dtype).removeprefix('torch.')}"):
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, trust_remote_code=trust_remote_code, **kw)
    if gguf_file:
        drop_gguf_marker(model)
    return model.to(device)


def load_model(cfg: ModelConfig, device: torch.device, dtype: torch.dtype = torch.float32):
    """The model to train, in ``dtype`` (fp32 master weights unless bf16-pure), with gradient
    checkpointing and LoRA as configured."""
    model = load_pretrained(cfg.name_or_path, dtype=dtype, gguf_file=cfg.gguf_file,
                            trust_remote_code=cfg.trust_remote_code, attn_implementation=cfg.attn_implementation)
    model.config.use_cache = False
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora_r > 0:
        from peft import LoraConfig, get_peft_model

        target = cfg.lora_target_modules
        lora = LoraConfig(
            r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, task_type="CAUSAL_LM",
            target_modules=target if target == "all-linear" else [t.strip() for t in target.split(",")],
        )
        model = get_peft_model(model, lora)
        if cfg.gradient_checkpointing:
            model.enable_input_require_grads()
    return model.to(device)


def stored_dtype(cfg: ModelConfig) -> torch.dtype:
    """The dtype the pretrained checkpoint is stored in (its config.json), fp32 if unknown:
    read before loading, which rewrites config.dtype to the load dtype."""
    from transformers import AutoConfig

    kw = {"gguf_file": cfg.gguf_file} if cfg.gguf_file else {}
    try:
        conf = AutoConfig.from_pretrained(cfg.name_or_path, trust_remote_code=cfg.trust_remote_code, **kw)
    except (OSError, ValueError):
        return torch.float32
    conf = conf.get_text_config() if hasattr(conf, "get_text_config") else conf
    dt = getattr(conf, "dtype", None) or getattr(conf, "torch_dtype", None)
    if isinstance(dt, str):
        dt = getattr(torch, dt, None)
    return dt if isinstance(dt, torch.dtype) and dt.is_floating_point else torch.float32


def drop_gguf_marker(model) -> None:
    """transformers dequantises GGUF weights on load but keeps a quantizer marker that makes
    save_pretrained refuse; the weights are plain tensors, so the marker goes."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def decoder_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The module that yields final hidden states, and the LM head (peft-aware)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder()
    head = base.get_output_embeddings()
    if decoder is None or head is None or not hasattr(head, "weight"):
        raise ConfigError(f"{type(base).__name__}: cannot find its decoder and LM head (get_decoder / get_output_embeddings)")
    return decoder, head


def logit_scale(model: nn.Module) -> float:
    """The factor some models apply to the head's output (Cohere, Granite, Falcon-H1).

    A scale folds into the hidden states (s * h @ W.T); a tanh soft-cap (Gemma 2) cannot,
    and is refused rather than silently trained without it.
    """
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if getattr(cfg, "final_logit_softcapping", None):
        raise ConfigError(f"{cfg.model_type}: final_logit_softcapping is not supported by token_loss")
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        if getattr(cfg, name, None) is not None:
            return float(getattr(cfg, name))
    if getattr(cfg, "logits_scaling", None) is not None:
        return 1.0 / float(cfg.logits_scaling)
    return 1.0


class PackingError(ValueError):
    """Packed rows on a model whose attention would cross example boundaries."""


def check_packing(model: nn.Module) -> str:
    """The attention implementation, if packed rows stay exact on ``model``; else raise.

    Exact means: transformers builds the model's mask (``masking_utils``) and derives the
    block-diagonal mask from ``position_ids`` restarts (sdpa, eager, flex), or the flash
    kernels get varlen ``cu_seqlens`` (passed by ``_hidden``). An implementation registered
    by a user, or remote code that builds its own causal mask, would silently let every
    token attend to the earlier examples of its row: refused.
    """
    import sys

    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    impl = getattr(base.config, "_attn_implementation", None) or "eager"
    decoder, _ = decoder_and_head(model)
    code = sys.modules.get(type(decoder).__module__)
    if impl not in ALL_MASK_ATTENTION_FUNCTIONS.valid_keys():
        raise PackingError(
            f"data.packing: attention implementation {impl!r} has no packed-sequence mask in transformers, so "
            "attention would cross example boundaries; use model.attn_implementation=sdpa (CPU/GPU), "
            "flash_attention_2 (GPU) or eager, or data.packing=false")
    if not any(hasattr(code, f) for f in ("create_causal_mask", "create_sliding_window_causal_mask")):
        raise PackingError(
            f"data.packing: {type(decoder).__name__} ({type(decoder).__module__}) builds its own attention mask "
            "instead of transformers' masking_utils, so it may ignore position_ids restarts and attend across "
            "examples; set data.packing=false")
    return impl


def segment_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) -> (B, T) ids unique over the batch: a new segment where positions do not go on
    by one (transformers' own rule for packed rows), and at every row start."""
    step = torch.ones_like(position_ids, dtype=torch.bool)
    step[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    return step.reshape(-1).cumsum(0).reshape(position_ids.shape)


def _packed_kwargs(model: nn.Module, position_ids: torch.Tensor) -> dict:
    impl = check_packing(model)
    if "flash" not in impl:
        return {}  # the mask functions read the restarts from position_ids
    # flash-attention derives cu_seqlens from position_ids only for one flattened row; give them
    # for the (B*T) tokens of the batch: every row starts with a segment at position 0
    starts = (segment_ids(position_ids).reshape(-1).diff() != 0).nonzero().squeeze(1) + 1
    total = position_ids.numel()
    cu = torch.cat([starts.new_zeros(1), starts, starts.new_full((1,), total)]).to(torch.int32)
    longest = int(cu.diff().max())
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


def _hidden(model: nn.Module, input_ids, attention_mask, position_ids=None) -> torch.Tensor:
    """Final hidden states (B, T, H). With ``position_ids`` the rows are packed: no 2-D mask
    and no cache are passed, so that transformers builds the per-example mask from the restarts."""
    decoder, _ = decoder_and_head(model)
    if position_ids is None:
        out = decoder(input_ids=input_ids, attention_mask=attention_mask)
    else:
        # no KV cache either: transformers reads the restarts only when there is none
        out = decoder(input_ids=input_ids, position_ids=position_ids, use_cache=False,
                      **_packed_kwargs(model, position_ids))
    hidden = out.last_hidden_state  # (B, T, H)
    scale = logit_scale(model)
    return hidden if scale == 1.0 else hidden * scale


class Reference(nn.Module):
    """A frozen copy of the initial model (iw_sft, asft, psft, KL logging) whose forward gives
    the final hidden states, as ``_hidden`` does for the policy. A module of its own so that
    FSDP can shard it as a root of its own (``dist.parallelize``): the root's forward gathers
    the embeddings, final norm and head; ``reshard`` frees them after the loss has read the head.

    dtype: the dtype its parameters are copied in (buffers, e.g. rotary frequencies, are kept
    as they are). Under FSDP with bf16-mixed, bf16: the policy computes with bf16 copies of its
    fp32 master weights, so a bf16 copy gives the same numbers at half the memory.
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype | None = None):
        super().__init__()
        # each parameter copied straight into its dtype (no transient full-precision copy); a
        # tied pair is one parameter, so it stays tied
        memo = {id(p): nn.Parameter(p.detach().to(dtype or p.dtype, copy=True), requires_grad=False)
                for p in model.parameters()}
        self.model = copy.deepcopy(model, memo).eval()

    def forward(self, input_ids, attention_mask, position_ids=None) -> torch.Tensor:
        return _hidden(self.model, input_ids, attention_mask, position_ids)


class CausalLMLoss(nn.Module):
    """Wraps a causal LM so that forward returns ``token_loss``'s result.

    It is this module that DDP/FSDP wrap, so the decoder and the head both run inside
    the wrapped forward. The reference for iw_sft/asft/KL logging is either a frozen
    copy of the initial model (``Reference``, in ``ref_dtype``), or, for LoRA, the same
    model with its adapters disabled.
    """

    def __init__(self, model: nn.Module, objective: Objective, *, backend: str = "chunked",
                 chunk_size: int | None = None, reference: str = "none", token_class: torch.Tensor | None = None,
                 ref_dtype: torch.dtype | None = None):
        super().__init__()
        self.model = model
        self.objective = objective  # the training loop sets it each step when a schedule moves it
        self.entropy = True  # the per-token entropy statistic; the loop turns it off between logging steps
        self.token_class = token_class  # (V,) class per vocabulary id (protect=, probe classes); not a buffer
        self.backend = backend
        self.chunk_size = chunk_size or None
        self.reference = reference  # none | copy | adapters
        if reference == "copy":
            # frozen, read under no_grad; computed in the model's precision (the same autocast, or
            # under FSDP the same bf16 gathering), so that at step 1 the reference's log-probs equal
            # the model's exactly (KL 0, iw-SFT weight 1)
            self._ref = [Reference(model, ref_dtype)]  # a list: not a submodule, so DDP/optimizer ignore it
        else:
            self._ref = []

    def _classes(self, device):
        if self.token_class is not None and self.token_class.device != device:
            self.token_class = self.token_class.to(device)
        return self.token_class

    def _reference(self, input_ids, attention_mask, position_ids):
        if self.reference == "none":
            return None, None, None
        with torch.no_grad():
            if self.reference == "copy":
                ref = self._ref[0].model
                h = self._ref[0](input_ids, attention_mask, position_ids)
            else:
                ref = self.model
                with self.model.disable_adapter():
                    h = _hidden(ref, input_ids, attention_mask, position_ids)
            _, head = decoder_and_head(ref)
            return h, head.weight.detach(), None if getattr(head, "bias", None) is None else head.bias.detach()

    def forward(self, input_ids, attention_mask, labels, num_items=None, position_ids=None) -> LossResult:
        """Packed rows (``dftune.batching``) come with ``position_ids`` restarting per example;
        their ``attention_mask`` is then not given to the model (it only marks padding)."""
        hidden = _hidden(self.model, input_ids, attention_mask, position_ids)  # (B, T, H)
        _, head = decoder_and_head(self.model)
        b, t, _ = hidden.shape
        flat, shifted = next_token_targets(hidden, labels)  # (B*(T-1), H), (B*(T-1),)
        if position_ids is None:  # one sequence per row
            seq_ids = torch.arange(b, device=labels.device).repeat_interleave(t - 1)
        else:  # the example each target belongs to (per-sequence objectives: iw_sft, talr)
            seq_ids = segment_ids(position_ids)[:, 1:].reshape(-1)
        ref_h, ref_w, ref_b = self._reference(input_ids, attention_mask, position_ids)
        res = token_loss(
            flat, head.weight, shifted, self.objective,
            bias=getattr(head, "bias", None), num_items=num_items, chunk_size=self.chunk_size,
            backend=self.backend, seq_ids=seq_ids, token_class=self._classes(hidden.device),
            ref_hidden=None if ref_h is None else next_token_targets(ref_h, labels)[0],
            ref_weight=ref_w, ref_bias=ref_b, entropy=self.entropy,
        )
        if self._ref and hasattr(self._ref[0], "reshard"):  # FSDP: the reference's gathered root goes
            self._ref[0].reshard()  # (every backend reads the reference in forward only)
        return res


def reference_kind(needs_ref: bool, lora: bool, log_kl: bool) -> str:
    """Which reference the run needs: none, a frozen copy, or the adapter-free base."""
    if not (needs_ref or log_kl):
        return "none"
    return "adapters" if lora else "copy"

