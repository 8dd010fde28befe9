import json

import numpy as np
import pytest
from transformers import AutoTokenizer

from dftune.batching import collate, plan_epoch
from dftune.config import DataConfig
from dftune.data import build_dataset
from dftune.records import DataError, gsm8k_boxed, select_rows
from tests.conftest import write_jsonl


@pytest.fixture
def tok(tiny_dir):
    return AutoTokenizer.from_pretrained(tiny_dir)


def _decode_targets(tok, ex):
    return tok.decode([t for t, lab in zip(ex.input_ids, ex.labels) if lab != -100])


def test_problem_solution_layout_is_the_papers(tok, problems_file):
    exs, summary = build_dataset(DataConfig(path=str(problems_file), instruction_suffix=" Think."), tok)
    assert summary.rows == summary.kept == 60 and not summary.dropped
    ex = exs[0]
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 1 plus 2? Think."}], add_generation_prompt=True,
                                     tokenize=True)
    prompt = prompt["input_ids"] if hasattr(prompt, "keys") else prompt
    n = len(prompt)
    assert ex.input_ids[:n] == list(prompt) and all(lab == -100 for lab in ex.labels[:n])
    assert ex.labels[n:] == ex.input_ids[n:] and ex.labels[-1] == tok.eos_token_id  # response + EOS
    assert _decode_targets(tok, ex).startswith("We add 1 and 2 to get 3.")


def test_messages_multi_turn_loss_on_assistant_turns_only(tok, tmp_path):
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 1 plus 2?"},
            {"role": "assistant", "content": "3"}, {"role": "user", "content": "And 2 plus 2?"},
            {"role": "assistant", "content": "4"}]
    f = write_jsonl(tmp_path / "chat.jsonl", [{"messages": conv}])
    (ex,), _ = build_dataset(DataConfig(path=str(f)), tok)
    target = _decode_targets(tok, ex)
    assert "3<|im_end|>" in target and "4<|im_end|>" in target
    assert "plus" not in target and "Be brief" not in target


def test_gsm8k_rewrite_and_question_answer_format(tok, tmp_path):
    assert gsm8k_boxed("2+2=4\n#### 1,234") == "2+2=4\nThe answer is $\\boxed{1234}$."
    f = write_jsonl(tmp_path / "g.jsonl", [{"question": "What is 2 plus 2?", "answer": "2+2=4\n#### 4"}])
    (ex,), _ = build_dataset(DataConfig(path=str(f)), tok)
    assert "\\boxed{4}" in _decode_targets(tok, ex)


@pytest.mark.parametrize("answer, final", [
    ("2+2=4\n#### 1,234", "1234"),          # thousands separators go
    ("a #### b\n#### 7 ", "7"),             # the last marker wins
    ("#### -3.5", "-3.5"),
    ("no marker, 42", ""),                  # nothing: callers decide (error or skipped row)
    ("####", ""),
])
def test_one_gsm8k_final_answer_parser(answer, final):
    """Training data, the gsm8k benchmark and offline sampling all read GSM8K's '#### N' line
    with dftune.records.gsm8k_final; this table is its contract."""
    from dftune.eval.benchmarks import to_problem
    from dftune.offline.sample import gold_answer
    from dftune.records import gsm8k_final

    assert gsm8k_final(answer) == final
    assert gold_answer({"question": "q", "answer": answer}, "question_answer") == ([final] if final else [])
    if final:
        assert to_problem("gsm8k", {"question": "q", "answer": answer}, 0, "x:1").golds == [final]



@pytest.mark.parametrize(
    "rows, match",
    [
        ([{"problem": "a", "solution": "b"}, {"problem": "c", "solution": 3}], r"g\.jsonl:2: field 'solution' must be a non-empty string"),
        ([{"problem": "a", "solution": "b"}, {"problem": "c"}], r"g\.jsonl:2: missing field 'solution'"),
        ([{"problem": "a", "solution": "b"}, {"problem": "", "solution": "x"}], r"g\.jsonl:2: field 'problem'"),
        ([{"text": "a"}], "cannot detect the record format"),
        ([{"messages": [{"role": "user", "content": "hi"}]}], "no assistant turn"),
        ([{"messages": [{"role": "bot", "content": "hi"}]}], r"'messages'\[0\]"),
    ],
)
def test_bad_rows_name_file_row_and_field(tok, tmp_path, rows, match):
    f = write_jsonl(tmp_path / "g.jsonl", rows)
    with pytest.raises(DataError, match=match):
        build_dataset(DataConfig(path=str(f)), tok)


def test_bad_json_line_and_skip_mode(tok, tmp_path):
    f = tmp_path / "g.jsonl"
    f.write_text(json.dumps({"problem": "a", "solution": "b"}) + "\n{oops\n")
    with pytest.raises(DataError, match=r"g\.jsonl, row 2: not valid JSON"):
        build_dataset(DataConfig(path=str(f)), tok)
    write_jsonl(f, [{"problem": "a", "solution": "b"}, {"problem": "c", "solution": 7}, {"problem": "d", "solution": "e"}])
    exs, summary = build_dataset(DataConfig(path=str(f), on_bad_row="skip"), tok)
    assert len(exs) == 2 and summary.dropped == {"bad_row": 1}


def test_prompt_overflow_is_dropped_and_long_responses_truncated(tok, tmp_path):
    rows = [{"problem": "What is 1 plus 2? " * 30, "solution": "3"}, {"problem": "Hi?", "solution": "We add. " * 60},
            {"problem": "Hi?", "solution": "3"}]
    f = write_jsonl(tmp_path / "g.jsonl", rows)
    exs, summary = build_dataset(DataConfig(path=str(f), max_length=64), tok)
    assert summary.dropped == {"prompt_overflow": 1} and summary.truncated == 1 and summary.kept == 2
    assert all(len(e.input_ids) <= 64 for e in exs)
    assert "2 kept" in str(summary) and "prompt_overflow: 1" in str(summary)


def test_missing_chat_template_is_a_clear_error_with_a_fallback(tok, problems_file):
    tok.chat_template = None
    with pytest.raises(DataError, match="no chat template"):
        build_dataset(DataConfig(path=str(problems_file)), tok)
    exs, _ = build_dataset(DataConfig(path=str(problems_file), chat_template="plain"), tok)
    # the Qwen2.5-Math harness's deepseek-math layout; this tokenizer has no BOS to prepend
    assert tok.decode(exs[0].input_ids).startswith("User: What is 1 plus 2?\n\nAssistant: We add")


def test_select_and_sources(tmp_path, tok, problems_file):
    rows = list(range(10))
    assert select_rows(rows, "first:3", 0) == [0, 1, 2]
    r = select_rows(rows, "random:4", 1)
    assert r == sorted(r) and len(r) == 4 and r == select_rows(rows, "random:4", 1)
    with pytest.raises(DataError, match="first:N"):
        select_rows(rows, "last:3", 0)
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    folder = tmp_path / "folder"
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist([{"prompt": "hi", "completion": "yo"}] * 3), folder / "a.parquet")
    write_jsonl(folder / "b.jsonl", [{"prompt": "x", "completion": "y"}])
    exs, _ = build_dataset(DataConfig(path=str(folder)), tok)
    assert len(exs) == 4
    with pytest.raises(DataError, match="not found"):
        build_dataset(DataConfig(path=str(tmp_path / "missing.jsonl")), tok)


def test_plan_keeps_each_steps_sequences_whatever_the_layout():
    lengths = [(i * 37) % 101 + 1 for i in range(100)]
    one = plan_epoch(100, 16, 1, 16, seed=3, epoch=0, lengths=lengths)
    two = plan_epoch(100, 16, 2, 2, seed=3, epoch=0, lengths=lengths)
    assert len(one) == len(two) == 6  # the incomplete last batch is dropped
    for a, b in zip(one, two):
        assert sorted(sum(a[0], [])) == sorted(sum(sum(b, []), []))
        assert all(len(mb) == 2 for rank in b for mb in rank) and len(b[0]) == 4
        # micro-batches hold similar lengths: the spread inside one is below the step's
        spreads = [max(lengths[i] for i in mb) - min(lengths[i] for i in mb) for rank in b for mb in rank]
        step_spread = max(lengths[i] for i in sum(a[0], [])) - min(lengths[i] for i in sum(a[0], []))
        assert max(spreads) < step_spread
    assert plan_epoch(100, 16, 1, 16, 3, 1, lengths) != one  # a new order each epoch
    with pytest.raises(ValueError, match="multiple"):
        plan_epoch(100, 10, 2, 4, 0, 0, lengths)


def test_collate_pads_and_masks(tok, problems_file):
    exs, _ = build_dataset(DataConfig(path=str(problems_file)), tok)
    b = collate([exs[0], exs[-1]], tok.pad_token_id)
    assert b["input_ids"].shape == b["labels"].shape == b["attention_mask"].shape
    short = min(range(2), key=lambda i: len([exs[0], exs[-1]][i].input_ids))
    n = len([exs[0], exs[-1]][short].input_ids)
    assert (b["labels"][short, n:] == -100).all() and (b["attention_mask"][short, n:] == 0).all()


def test_pretokenized_rows(tok, tmp_path):
    f = write_jsonl(tmp_path / "t.jsonl", [{"input_ids": [5, 6, 7, 8], "completion_mask": [0, 0, 1, 1]}])
    (ex,), _ = build_dataset(DataConfig(path=str(f)), tok)
    assert ex.input_ids == [5, 6, 7, 8] and ex.labels == [-100, -100, 7, 8]
    write_jsonl(f, [{"input_ids": [5, 6, 7], "completion_mask": [0, 1]}])
    with pytest.raises(DataError, match=r"t\.jsonl:1: fields 'input_ids' and 'completion_mask' differ"):
        build_dataset(DataConfig(path=str(f)), tok)
    write_jsonl(f, [{"input_ids": [5, 10**6], "completion_mask": [0, 1]}])
    with pytest.raises(DataError, match="outside the tokenizer's vocabulary"):
        build_dataset(DataConfig(path=str(f)), tok)


def test_plain_template_puts_bos_once_and_agrees_across_formats(tok, tmp_path):
    """Base models with a BOS (LLaMA, DeepSeekMath) get it once, at the start; a
    problem/solution row and the same row as messages tokenize identically."""
    import copy

    t = copy.deepcopy(tok)
    t.bos_token = "<|im_start|>"  # stands in for <|begin_of_text|>
    ps = write_jsonl(tmp_path / "ps.jsonl", [{"problem": "What is 1 plus 2?", "solution": "It is 3."}])
    ms = write_jsonl(tmp_path / "ms.jsonl", [{"messages": [{"role": "user", "content": "What is 1 plus 2?"},
                                                           {"role": "assistant", "content": "It is 3."}]}])
    a, _ = build_dataset(DataConfig(path=str(ps), chat_template="plain"), t)
    b, _ = build_dataset(DataConfig(path=str(ms), chat_template="plain"), t)
    assert a[0].input_ids[0] == t.bos_token_id and a[0].input_ids.count(t.bos_token_id) == 1
    # messages add the template's "\n\n" after EOS; the rest, labels included, is the same
    n = len(a[0].input_ids)
    assert b[0].input_ids[:n] == a[0].input_ids and b[0].labels[:n] == a[0].labels
    assert t.decode([x for x in a[0].labels if x != -100]) == " It is 3.<|endoftext|>"


# ---- bad rows: each stops with file, row and field ---------------------------------------

RAISING_TEMPLATE = ("{% for m in messages %}{% if 'forbidden' in m['content'] %}{{ raise_exception('no forbidden words') }}"
                    "{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
GOOD = json.dumps({"problem": "What is 1 plus 2?", "solution": "3"}).encode()


@pytest.mark.parametrize(
    "name, lines, extra, match",
    [
        ("not UTF-8", [GOOD, b'{"problem": "caf\xe9?", "solution": "x"}'], {},
         r"g\.jsonl, row 2: not valid UTF-8 \(byte 0xe9 at column 17\)"),
        ("lone surrogate", [GOOD, b'{"problem": "a", "solution": "b \\ud800 c"}'], {},
         r"g\.jsonl:2: field 'solution' holds a lone surrogate \(\\ud800"),
        ("template raises", [GOOD, json.dumps({"problem": "a forbidden word", "solution": "x"}).encode()],
         {"chat_template": "RAISING"}, r"g\.jsonl:2: the chat template failed on field 'problem': .*no forbidden words"),
        ("first row not an object", [b"[1, 2]", GOOD], {}, r"g\.jsonl:1: expected a JSON object .*got list"),
        ("first row a number", [b"7"], {}, r"g\.jsonl:1: expected a JSON object .*got int"),
        ("later row not an object", [GOOD, b'"text"'], {}, r"g\.jsonl:2: expected a JSON object, got str"),
        ("all-zero completion mask", [json.dumps({"input_ids": [5, 6, 7], "completion_mask": [1, 0, 0]}).encode()], {},
         r"g\.jsonl:1: field 'completion_mask' marks no token to learn"),
        ("mask not 0/1", [json.dumps({"input_ids": [5, 6, 7], "completion_mask": [0, 2, 1]}).encode()], {},
         r"g\.jsonl:1: field 'completion_mask'\[1\] is 2"),
        ("booleans as token ids", [json.dumps({"input_ids": [5, True, 7], "completion_mask": [0, 1, 1]}).encode()], {},
         r"g\.jsonl:1: field 'input_ids'\[1\] is bool True, not an integer token id"),
        ("float token id", [json.dumps({"input_ids": [5, 6.0], "completion_mask": [0, 1]}).encode()], {},
         r"g\.jsonl:1: field 'input_ids'\[1\] is float"),
        ("empty assistant turn", [json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                           {"role": "assistant", "content": "  "}]}).encode()], {},
         r"g\.jsonl:1: field 'messages'\[1\] is an empty assistant turn"),
        ("surrogate in a message", [json.dumps({"messages": [{"role": "user", "content": "hi \ud83d"},
                                                             {"role": "assistant", "content": "yo"}]}).encode()], {},
         r"g\.jsonl:1: field 'messages'\[0\] holds a lone surrogate"),
    ],
)
def test_bad_rows_stop_with_file_row_and_field(tok, tmp_path, name, lines, extra, match):
    f = tmp_path / "g.jsonl"
    f.write_bytes(b"\n".join(lines) + b"\n")
    if extra.get("chat_template") == "RAISING":
        (tmp_path / "t.jinja").write_text(RAISING_TEMPLATE)
        extra = {"chat_template": str(tmp_path / "t.jinja")}
    with pytest.raises(DataError, match=match):
        build_dataset(DataConfig(path=str(f), **extra), tok)


def test_unreadable_rows_follow_on_bad_row(tok, tmp_path):
    f = tmp_path / "g.jsonl"
    f.write_bytes(b"\n".join([GOOD, b'{"problem": "\xff", "solution": "x"}', b"{oops", GOOD]) + b"\n")
    exs, summary = build_dataset(DataConfig(path=str(f), on_bad_row="skip"), tok)
    assert len(exs) == 2 and summary.dropped == {"bad_row": 2}
    assert summary.dropped_rows["bad_row"] == [f"{f}:2", f"{f}:3"]
    assert [e.source for e in exs] == [f"{f}:1", f"{f}:4"]


def test_dropped_long_prompts_are_named_in_the_summary(tok, tmp_path):
    rows = [{"problem": "Hi?", "solution": "3"}] + [{"problem": f"What is {i} plus 2? " * 30, "solution": "3"} for i in range(7)]
    f = write_jsonl(tmp_path / "g.jsonl", rows)
    _, summary = build_dataset(DataConfig(path=str(f), max_length=64), tok)
    assert summary.dropped == {"prompt_overflow": 7}
    assert summary.dropped_rows["prompt_overflow"] == [f"{f}:{i}" for i in range(2, 7)]  # the first five
    assert f"prompt_overflow: 7 [{f}:2, {f}:3, {f}:4, {f}:5, {f}:6, ...]" in str(summary)


@pytest.mark.parametrize("path", ["data/train.jsonl", "missing.parquet", "./x", "nothere/sub/dir", "exists/name"])
def test_missing_local_path_is_file_not_found_not_a_hub_lookup(tok, tmp_path, monkeypatch, path):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "exists").mkdir()  # "exists/name": a folder of that name is here, so the path is local
    with pytest.raises(DataError, match=r"data file not found: .* \(relative paths are read from"):
        build_dataset(DataConfig(path=path), tok)


# ---- storage, cache, workers, Hub datasets -------------------------------------------------


def _same(a, b):
    return (np.array_equal(a.ids, b.ids) and np.array_equal(a.mask, b.mask) and np.array_equal(a.offsets, b.offsets)
            and np.array_equal(a.origin, b.origin))


def test_examples_are_compact_arrays(tok, problems_file):
    data, summary = build_dataset(DataConfig(path=str(problems_file), cache=False), tok)
    assert data.ids.dtype == np.int32 and data.mask.dtype == np.uint8 and len(data.ids) == int(data.offsets[-1])
    assert data.nbytes <= 5 * len(data.ids) + 24 * len(data) + 8
    assert summary.response_tokens == int(data.mask.sum())
    ex = data[3]
    assert len(ex.input_ids) == data.lengths[3] and ex.source == f"{problems_file}:4"
    assert data.targets[3] == sum(lab != -100 for lab in ex.labels[1:])
    assert [e.source for e in data[1:3]] == [data.source(1), data.source(2)] and data[-1].source == data.source(59)


def test_cache_hits_misses_and_is_shared(tok, tmp_path):
    rows = [{"problem": f"What is {i} plus 2?", "solution": f"It is {i + 2}."} for i in range(30)]
    f = write_jsonl(tmp_path / "g.jsonl", rows)
    cache = tmp_path / "cache"
    cfg = DataConfig(path=str(f), cache_dir=str(cache))
    fresh, s0 = build_dataset(DataConfig(path=str(f), cache=False), tok)
    a, s1 = build_dataset(cfg, tok)
    b, s2 = build_dataset(DataConfig(path=str(f), cache_dir=str(cache), packing=True, workers=1), tok)
    assert s0.cache == "" and s1.cache.startswith("written ") and s2.cache.startswith("hit ")
    assert _same(fresh, a) and _same(a, b) and isinstance(b.ids, np.memmap)
    assert {k: v for k, v in s2.__dict__.items() if k != "cache"} == {k: v for k, v in s0.__dict__.items() if k != "cache"}
    # a copy of the file under another name hits, and its rows are named after the copy
    g = tmp_path / "copy.jsonl"
    g.write_bytes(f.read_bytes())
    c, s3 = build_dataset(DataConfig(path=str(g), cache_dir=str(cache)), tok)
    assert s3.cache.startswith("hit ") and c[0].source == f"{g}:1"
    # what changes the tokens misses: the data, the settings, the template
    write_jsonl(f, rows[:-1] + [{"problem": "changed", "solution": "x"}])
    assert build_dataset(cfg, tok)[1].cache.startswith("written ")
    assert build_dataset(DataConfig(path=str(f), cache_dir=str(cache), max_length=24), tok)[1].cache.startswith("written ")
    assert build_dataset(DataConfig(path=str(f), cache_dir=str(cache), chat_template="plain"), tok)[1].cache.startswith("written ")
    assert not list(cache.glob("*.tmp-*"))


def test_unusable_cache_folder_falls_back_to_no_cache(tok, problems_file, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    data, summary = build_dataset(DataConfig(path=str(problems_file), cache_dir=str(blocker / "cache")), tok)
    assert len(data) == 60 and summary.cache == ""
    assert "cannot use the cache folder" in capsys.readouterr().out


def test_failed_build_leaves_no_cache_entry(tok, tmp_path):
    f = write_jsonl(tmp_path / "g.jsonl", [{"problem": "a", "solution": "b"}] * 600 + [{"problem": "c"}])
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match="missing field 'solution'"):
        build_dataset(DataConfig(path=str(f), cache_dir=str(cache)), tok)
    assert [p.suffix for p in cache.iterdir()] == [".lock"]


def _build_in_process(args):
    path, cache, model = args
    from transformers import AutoTokenizer

    data, summary = build_dataset(DataConfig(path=path, cache_dir=cache), AutoTokenizer.from_pretrained(model))
    return summary.cache.split()[0], data.ids.sum()


def test_concurrent_processes_build_once(tiny_dir, tmp_path):
    """As the processes of a torchrun start together: one tokenises, the other waits and maps."""
    import multiprocessing

    from tests.conftest import PROBLEMS

    f = write_jsonl(tmp_path / "g.jsonl", PROBLEMS * 20)
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        out = pool.map(_build_in_process, [(str(f), str(tmp_path / "cache"), str(tiny_dir))] * 2)
    assert sorted(s for s, _ in out) == ["hit", "written"] and out[0][1] == out[1][1]


@pytest.mark.parametrize("fmt_rows", ["problem_solution", "messages"])
def test_worker_processes_give_the_same_data(tok, tmp_path, fmt_rows):
    from tests.conftest import PROBLEMS

    rows = PROBLEMS * 12
    if fmt_rows == "messages":
        rows = [{"messages": [{"role": "user", "content": r["problem"]}, {"role": "assistant", "content": r["solution"]}]}
                for r in rows]
    rows[700] = {"problem": "x"} if fmt_rows == "problem_solution" else {"messages": []}
    f = write_jsonl(tmp_path / "g.jsonl", rows)
    one, s1 = build_dataset(DataConfig(path=str(f), cache=False, workers=1, on_bad_row="skip", max_length=40), tok)
    two, s2 = build_dataset(DataConfig(path=str(f), cache=False, workers=2, on_bad_row="skip", max_length=40), tok)
    assert _same(one, two) and s1 == s2 and s1.dropped["bad_row"] == 1 and s1.truncated > 0
    with pytest.raises(DataError, match=r"g\.jsonl:701"):
        build_dataset(DataConfig(path=str(f), cache=False, workers=2), tok)


def test_hub_datasets_are_read_in_batches_from_arrow(tok, tmp_path):
    """A Hub dataset is a memory-mapped datasets.Dataset: built here from local Parquet files in
    the Hub layout (nothing is downloaded), read batch by batch."""
    datasets = pytest.importorskip("datasets")
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dftune.data import _build
    from dftune.records import Source, dataset_rows

    (tmp_path / "hub" / "data").mkdir(parents=True)
    rows = [{"problem": f"What is {i} plus 1?", "solution": f"{i + 1}"} for i in range(2500)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "hub" / "data" / "train-00000-of-00001.parquet")
    ds = datasets.load_dataset(str(tmp_path / "hub"), split="train", cache_dir=str(tmp_path / "hf"))
    got = list(dataset_rows(ds, batch_size=1000))
    assert got[0] == (1, rows[0]) and got[-1] == (2500, rows[-1]) and len(got) == 2500
    data, summary = _build(DataConfig(path="org/name", select="first:1200"), tok, 0, Source(["org/name[train]"], hub=ds),
                           tmp_path / "built")
    assert summary.kept == 1200 and data.source(1199) == "org/name[train]:1200"
