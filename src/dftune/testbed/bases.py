"""The testbed's pretrained bases, pretrained with NLL on the arithmetic of
``tasks.PRETRAIN_MIX`` in two surface forms.

- ``weak``: the problems and their computations as plain-text notes
  (``tasks.notes_document``: "Work: add 3 to 5, get 8; ...  Result: 8"), several to a row,
  as raw documents: no chat template, no box, and never an EOS or end-of-turn token as a
  target. The model learns the arithmetic but not the demonstrations' wording, layout or
  when to stop: a weak prior for the demonstrations (the probe measures how weak), like a
  base model pretrained on another surface form of a task.
- ``strong``: the weak base, further pretrained on the same problems in the
  demonstrations' own format: the chat template with the paper's system turn and boxed
  instruction, "a + b = c." lines, "The answer is \\boxed{N}." and the end-of-text token
  (EOS). Fine-tuning on the demonstrations then starts from a prior that already predicts
  them well. (Continuing from the weak base rather than pretraining a second model from
  scratch halves the CPU time, and makes the difference between the two bases exactly
  the demonstrations' surface form.)

One tokenizer and one random initialisation. Each base is cached under a hash of
everything it is built from (the task generator's source, the recipe, the shapes), so a
changed recipe never reuses a stale base.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict
from pathlib import Path

from dftune.config import Config, DataConfig, ModelConfig, TrainConfig
from dftune.eval.benchmarks import INSTRUCTION
from dftune.testbed import tasks

# The bases' chat template: ChatML with a default system turn (as Qwen2.5's templates
# have), the paper's "You are a helpful assistant." So the model's own template ("chat"
# prompt) renders exactly the paper's qwen-boxed prompt, which is also what periodic
# evaluation during training uses, and training, sampling (dftune sample), TRL's DPO/GRPO
# and evaluation all see one layout. Generation stops at EOS and <|im_end|> (the model's
# generation config lists both, as Qwen's do).
SYSTEM = "You are a helpful assistant."
CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\n" + SYSTEM + "<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SUFFIX = "\n" + INSTRUCTION
PROMPT = "chat"
FORMAT = 3  # bump when the recipe below changes in a way the cache key does not see
NOTES_PER_ROW = 3  # notes documents packed into one weak-pretraining row
MAX_LENGTH = 320


def data_config(path: str | Path, **kw) -> DataConfig:
    """The demonstrations' layout: the chat template (with its system turn) on the problem
    and the boxed instruction; the response + EOS."""
    return DataConfig(path=str(path), max_length=MAX_LENGTH, instruction_suffix=SUFFIX, **kw)


def pretraining_rows(examples: int) -> list[dict]:
    """The pretraining problems: an equal share of each spec of ``tasks.PRETRAIN_MIX``."""
    per_spec = examples // len(tasks.PRETRAIN_MIX)
    return [r for i, s in enumerate(tasks.PRETRAIN_MIX) for r in tasks.generate(s, per_spec, seed=1000 + i, prefix=f"m{i}-")]


def cache_key(recipe: dict) -> str:
    """A hash of the task generator's source and the recipe (steps, data, optimiser, shape)."""
    full = {"tasks_source": Path(tasks.__file__).read_text(), "mix": [asdict(s) for s in tasks.PRETRAIN_MIX],
            "instruction": INSTRUCTION, "template": CHAT_TEMPLATE, "format": FORMAT, "notes_per_row": NOTES_PER_ROW, **recipe}
    return hashlib.sha256(json.dumps(full, sort_keys=True).encode()).hexdigest()[:16]


def _write_jsonl(path: Path, rows) -> Path:
    from dftune.files import write_text

    write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
    return path


def initial_model(cache: Path, rows: list[dict], *, hidden: int, layers: int, heads: int) -> Path:
    """The tokenizer (digit-splitting BPE over both surface forms and the chat template's
    words) and the random model that both bases start from."""
    from dftune.tiny import make_tiny

    folder = cache / f"init-{cache_key({'hidden': hidden, 'layers': layers, 'heads': heads, 'rows': len(rows)})}"
    if (folder / "config.json").is_file():
        return folder
    from transformers import AutoTokenizer, GenerationConfig

    texts = [f"{SYSTEM}\n{r['problem']}{SUFFIX}\n{r['solution']}" for r in rows[:1500]]
    texts += [tasks.notes_document(r) for r in rows[:1500]]
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    make_tiny(tmp, texts, vocab_size=512, split_digits=True, hidden=hidden, layers=layers, heads=heads,
              intermediate=4 * hidden, max_positions=512)
    tok = AutoTokenizer.from_pretrained(tmp)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(tmp)
    gen = GenerationConfig.from_pretrained(tmp)
    gen.eos_token_id = [tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")]
    gen.save_pretrained(tmp)
    tmp.rename(folder)
    return folder


def notes_rows(tokenizer, rows: list[dict]) -> list[dict]:
    """Weak pretraining rows: NOTES_PER_ROW notes documents, tokenised as plain text, loss on
    every token, no special token anywhere (``dftune.data``'s tokenized format)."""
    out = []
    for s in range(0, len(rows) - NOTES_PER_ROW + 1, NOTES_PER_ROW):
        text = "".join(tasks.notes_document(r) for r in rows[s:s + NOTES_PER_ROW])
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:MAX_LENGTH]
        out.append({"input_ids": ids, "completion_mask": [1] * len(ids)})
    return out


def _pretrain(init: Path, folder: Path, data: DataConfig, *, steps: int, batch: int, lr: float) -> Path:
    from dftune.train import train

    run = Config(model=ModelConfig(name_or_path=str(init)), data=data,
                 train=TrainConfig(objective="nll", lr=lr, global_batch=batch, micro_batch=batch, max_steps=steps,
                                   epochs=100, warmup_ratio=0.05, min_lr_ratio=0.1, out_dir=str(folder / "run"),
                                   tensorboard=False, log_every=max(steps // 4, 1)))
    final = train(run)
    final.rename(folder / "final.tmp")
    (folder / "final.tmp").rename(folder / "final")  # the cache entry appears only once complete
    shutil.rmtree(folder / "run" / "checkpoints", ignore_errors=True)
    return folder / "final"


def pretrained_base(prior: str, cache: Path, *, steps: int, format_steps: int, examples: int, batch: int, lr: float,
                    hidden: int, layers: int, heads: int) -> Path:
    """The cached ``final`` folder of the ``prior`` base, built (with the weak one first,
    for the strong one) if missing. steps: the weak base's notes pretraining; format_steps:
    the strong base's further pretraining in the demonstrations' format."""
    from dftune.model import load_tokenizer

    if prior not in ("weak", "strong"):
        raise ValueError(f"prior must be weak or strong; got {prior!r}")
    recipe = {"steps": steps, "examples": examples, "batch": batch, "lr": lr, "hidden": hidden, "layers": layers,
              "heads": heads}
    if prior == "strong":
        recipe = {**recipe, "format_steps": format_steps}
    folder = cache / f"{prior}-{cache_key(recipe)}"
    if (folder / "final" / "config.json").is_file():
        print(f"base '{prior}': cached at {folder}")
        return folder / "final"
    shutil.rmtree(folder, ignore_errors=True)
    rows = pretraining_rows(examples)
    if prior == "strong":
        weak = pretrained_base("weak", cache, steps=steps, format_steps=0, examples=examples, batch=batch, lr=lr,
                               hidden=hidden, layers=layers, heads=heads)
        data = data_config(_write_jsonl(folder / "pretrain.jsonl",
                                        [{"problem": r["problem"], "solution": r["solution"]} for r in rows]))
        print(f"base 'strong': the weak base + {format_steps} steps in the demonstrations' format -> {folder}")
        return _pretrain(weak, folder, data, steps=format_steps, batch=batch, lr=lr)
    init = initial_model(cache, rows, hidden=hidden, layers=layers, heads=heads)
    tok = load_tokenizer(str(init))
    data = DataConfig(path=str(_write_jsonl(folder / "pretrain.jsonl", notes_rows(tok, rows))), format="tokenized",
                      max_length=MAX_LENGTH)
    print(f"base 'weak': pretraining {steps} steps on plain-text notes -> {folder}")
    per_step = max(1, batch // NOTES_PER_ROW)  # rows of NOTES_PER_ROW documents: `batch` problems per step
    return _pretrain(init, folder, data, steps=steps, batch=per_step, lr=lr)
