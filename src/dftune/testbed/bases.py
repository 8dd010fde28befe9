"""The testbed's pretrained bases: one random initialisation and one tokenizer, pretrained
with NLL on the same problems (``tasks.PRETRAIN_MIX``), the same number of steps, in two
surface forms.

- ``weak``: the problems and their computations as plain-text notes
  (``tasks.notes_document``: "Problem: ...\nWork: Ava has 5 pens.\n5 + 3 = 8.\nResult: 8"),
  one to a row, as raw documents: no chat template, no box, and never an EOS or end-of-turn
  token as a target. The model learns the arithmetic, in the demonstrations' own notation
  (``notes_accuracy`` measures it in its own form), but not the demonstrations' chat turn,
  wording, box or when to stop: a weak prior for the demonstrations (the probe measures how
  weak), like a base model pretrained on another surface form of a task. (``notation=words``,
  "5 plus 3 is 8", was the earlier weak base: see docs/testbed.md's design log.)
- ``strong``: the same problems in the demonstrations' own format: the chat template with
  the paper's system turn and boxed instruction, "a + b = c." lines, "The answer is
  \\boxed{N}." and the end-of-text token (EOS). Fine-tuning then starts from a prior that
  already predicts the demonstrations well.

(Continuing the weak base on the format instead was tried: at this size the notes give the
format no head start, so the strong base is pretrained from the initialisation too, and
both can be built at once on two cores.) Each base is cached under a hash of everything
it is built from (the task generator's source, the recipe, the shapes), so a changed
recipe never reuses a stale base.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

from dftune.config import Config, DataConfig, ModelConfig, TrainConfig
from dftune.eval.benchmarks import INSTRUCTION
from dftune.files import write_jsonl
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
FORMAT = 6  # bump when the recipe below changes in a way the cache key does not see
MAX_LENGTH = 320
PRIORS = ("weak", "strong")


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
            "instruction": INSTRUCTION, "template": CHAT_TEMPLATE, "format": FORMAT, **recipe}
    return hashlib.sha256(json.dumps(full, sort_keys=True).encode()).hexdigest()[:16]


def initial_model(cache: Path, rows: list[dict], *, hidden: int, layers: int, heads: int) -> Path:
    """The tokenizer (digit-splitting BPE over both surface forms and the chat template's
    words) and the random model that both bases start from."""
    from dftune.tiny import make_tiny

    folder = cache / f"init-{cache_key({'hidden': hidden, 'layers': layers, 'heads': heads, 'rows': len(rows)})}"
    if (folder / "config.json").is_file():
        return folder
    from transformers import AutoTokenizer, GenerationConfig

    texts = [f"system\n{SYSTEM}\nuser\n{r['problem']}{SUFFIX}\nassistant\n{r['solution']}" for r in rows[:1500]]
    # the notes in words, as the first weak base had them: the tokenizer, the initialisation and so
    # the strong base stay those of earlier versions (the symbols notation adds no new strings)
    texts += [tasks.notes_document(r, "words") for r in rows[:1500]]
    tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")  # two processes may build it at once
    shutil.rmtree(tmp, ignore_errors=True)
    make_tiny(tmp, texts, vocab_size=512, split_digits=True, hidden=hidden, layers=layers, heads=heads,
              intermediate=4 * hidden, max_positions=512)
    tok = AutoTokenizer.from_pretrained(tmp)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(tmp)
    gen = GenerationConfig.from_pretrained(tmp)
    gen.eos_token_id = [tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")]
    gen.save_pretrained(tmp)
    try:
        tmp.rename(folder)
    except OSError:  # the other process was first: its model is the same (same seed and data)
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def notes_rows(tokenizer, rows: list[dict], notation: str = "symbols") -> list[dict]:
    """Weak pretraining rows: one notes document each, tokenised as plain text, no special
    token anywhere (``dftune.data``'s tokenized format). The loss is on the worked part
    ("Work: ... Result: N"), not the problem line: the strong base's loss is on the
    demonstrations' response only, so both bases spend their gradient on the same
    computation and differ in its surface form."""
    out = []
    for r in rows:
        problem, work = tasks.notes_document(r, notation).split("\nWork: ", 1)
        ids, mask = [], []
        for text, m in ((problem + "\n", 0), ("Work: " + work, 1)):
            piece = tokenizer(text, add_special_tokens=False)["input_ids"]
            ids += piece
            mask += [m] * len(piece)
        out.append({"input_ids": ids[:MAX_LENGTH], "completion_mask": mask[:MAX_LENGTH]})
    return out


def _pretrain(init: Path, folder: Path, data: DataConfig, *, steps: int, batch: int, lr: float) -> Path:
    from dftune.train import train

    run = Config(model=ModelConfig(name_or_path=str(init)), data=data,
                 train=TrainConfig(objective="nll", lr=lr, global_batch=batch, micro_batch=batch, max_steps=steps,
                                   epochs=100, warmup_ratio=0.05, min_lr_ratio=0.1, out=str(folder / "run"),
                                   log_every=max(steps // 4, 1)))
    final = train(run)
    final.rename(folder / "final.tmp")
    (folder / "final.tmp").rename(folder / "final")  # the cache entry appears only once complete
    shutil.rmtree(folder / "run" / "checkpoints", ignore_errors=True)
    return folder / "final"


def base_folder(prior: str, cache: Path, **recipe) -> Path:
    if prior not in PRIORS:
        raise ValueError(f"prior must be weak or strong; got {prior!r}")
    return cache / f"{prior}-{cache_key(recipe)}"


def pretrained_base(prior: str, cache: Path, *, steps: int, examples: int, batch: int, lr: float, hidden: int,
                    layers: int, heads: int, notation: str = "symbols", wrong_last_steps: float = 0.0) -> Path:
    """The cached ``final`` folder of the ``prior`` base, pretrained if missing: ``steps``
    steps of ``batch`` problems (of ``examples``) at ``lr``, from the shared initialisation;
    the weak base's notes in ``notation`` (``tasks.NOTATIONS``).
    ``wrong_last_steps`` (strong only): the share of its pretraining solutions whose last step
    is off by 1 to 3 (``tasks.with_wrong_last_step``): a base that often slips at the end of a
    derivation it otherwise gets right (the offline demo's)."""
    import random

    from dftune.model import load_tokenizer

    recipe = {"steps": steps, "examples": examples, "batch": batch, "lr": lr, "hidden": hidden, "layers": layers,
              "heads": heads}
    if prior == "weak":
        recipe["notation"] = notation
    if wrong_last_steps:  # only when set: the other bases keep their cache keys
        recipe["wrong_last_steps"] = wrong_last_steps
    folder = base_folder(prior, cache, **recipe)
    if (folder / "final" / "config.json").is_file():
        print(f"base '{prior}': cached at {folder}")
        return folder / "final"
    shutil.rmtree(folder, ignore_errors=True)
    rows = pretraining_rows(examples)
    init = initial_model(cache, rows, hidden=hidden, layers=layers, heads=heads)
    if prior == "strong":
        rng = random.Random("sloppy")
        rows = [tasks.with_wrong_last_step(r, rng) if rng.random() < wrong_last_steps else r for r in rows]
        data = data_config(write_jsonl(folder / "pretrain.jsonl",
                                        [{"problem": r["problem"], "solution": r["solution"]} for r in rows]))
        print(f"base 'strong': pretraining {steps} steps in the demonstrations' format -> {folder}")
    else:
        tok = load_tokenizer(str(init))
        data = DataConfig(path=str(write_jsonl(folder / "pretrain.jsonl", notes_rows(tok, rows, notation))),
                          format="tokenized", max_length=MAX_LENGTH)
        print(f"base 'weak': pretraining {steps} steps on plain-text notes ({notation}) -> {folder}")
    return _pretrain(init, folder, data, steps=steps, batch=batch, lr=lr)


def notes_accuracy(model, tokenizer, rows: list[dict], max_new_tokens: int = 64, notation: str = "symbols") -> float:
    """The fraction of ``rows`` whose notes the model completes correctly (greedy) from
    "Problem: ...\\nWork:": the arithmetic the weak base knows, in its own surface form."""
    import torch

    right = 0
    for r in rows:
        doc = tasks.notes_document(r, notation)
        prefix = doc[:doc.index("\nWork:") + len("\nWork:")]
        ids = tokenizer(prefix, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=None)
        text = prefix + tokenizer.decode(out[0][ids["input_ids"].shape[1]:])
        right += tasks.check_notes(text.split("\n\n")[0] + "\n\n", r["answer"], notation)
    return right / max(len(rows), 1)
