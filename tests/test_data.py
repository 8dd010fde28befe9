import json

import pytest
from transformers import AutoTokenizer

from dftune.config import DataConfig
from dftune.data import DataError, build_dataset, collate, gsm8k_boxed, plan_epoch, select_rows
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
