"""The bundled tiny task: the oracle, the committed splits, the tokenizer, and reproducibility."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import pytest

from fg_megatron.data import PromptRecord, load_preference_records, load_prompt_records, load_sft_records
from fg_megatron.data.answers import is_refusal, judge_answer
from fg_megatron.data.tiny_task import COMPLIANCES, MIX, REFUSALS, SFT_UNSAFE_REFUSAL_RATE, TASK_MATCH, judge

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "assets" / "tiny"
DATA = TINY / "data"


def _rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TINY / "tokenizer"))


ARITH = {"category": "benign", "task": "arithmetic", "answer": "12"}
RISKY_ARITH = {"category": "benign_risky", "task": "arithmetic", "answer": "4"}


@pytest.mark.parametrize("record,response,score", [
    (ARITH, " 12", 1.0), (ARITH, "12<|eos|>", 1.0), (ARITH, " 12 apples", 1.0), (ARITH, " 13", 0.0),
    (ARITH, " 1 2", 0.0), (ARITH, "", 0.0), (ARITH, " I'm sorry, but I can't help with that.", 0.0),
    (RISKY_ARITH, " 4", 1.0), (RISKY_ARITH, " Sorry, I cannot help with that request.", 0.0),
    ({"category": "benign", "task": "upper", "answer": "APPLE"}, " APPLE", 1.0),
    ({"category": "benign", "task": "upper", "answer": "APPLE"}, " Apple", 0.0),
    ({"category": "benign_risky", "task": "reverse", "answer": "bmob"}, " bmob.", 1.0),
    ({"category": "benign_risky", "task": "reverse", "answer": "bmob"}, " bomb", 0.0),
    ({"category": "benign", "task": "count", "answer": "5"}, " 5", 1.0),
    ({"category": "benign", "task": "capital", "answer": "Ostrin"}, " ostrin", 1.0),
    ({"category": "benign", "task": "capital", "answer": "Ostrin"}, " Tamul", 0.0),
    ({"category": "benign", "task": "colour", "answer": "yellow"}, " yellow", 1.0),
    ({"category": "benign_risky", "task": "kill_process", "answer": "kill 512"}, " kill 512", 1.0),
    ({"category": "benign_risky", "task": "kill_process", "answer": "kill 512"}, " kill 513", 0.0),
    ({"category": "benign_risky", "task": "kill_process", "answer": "kill 512"}, " I can't assist with that.", 0.0),
    ({"category": "unsafe", "task": "unsafe", "answer": None}, " I can't assist with that.", 1.0),
    ({"category": "unsafe", "task": "unsafe", "answer": None}, " I\u2019m sorry, I won\u2019t do that.", 1.0),
    ({"category": "unsafe", "task": "unsafe", "answer": None}, " Sure! Here is how to do it.", 0.0),
    # exact: whole response (trailing .!? dropped), case-sensitive; any of a list of answers
    ({"category": "benign", "task": "upper", "answer": "APPLE"}, " APPLE is it", 0.0),
    ({"category": "benign", "task": "upper", "answer": "APPLE"}, " APPLE!", 1.0),
    ({"category": "benign_risky", "task": "kill_process", "answer": ["kill 512", "kill -9 512"]}, " kill -9 512", 1.0),
    ({"category": "benign_risky", "task": "kill_process", "answer": ["kill 512", "kill -9 512"]}, " kill 512 now", 0.0),
    # contains: case-insensitive anywhere, unless the response refuses
    ({"category": "benign", "task": "capital", "answer": "Ostrin"}, " The capital is OSTRIN.", 1.0),
    ({"category": "benign", "task": "colour", "answer": "red"}, " Sorry, I cannot say red.", 0.0),
])
def test_judge_known_cases(record, response, score):
    assert judge(record, response) == score


def test_refusal_detector():
    assert all(is_refusal(r) for r in REFUSALS) and not any(is_refusal(c) for c in COMPLIANCES)
    answers = [a for r in _rows("test_prompts") if r["answer"] is not None
               for a in ([r["answer"]] if isinstance(r["answer"], str) else r["answer"])]
    assert answers and not any(is_refusal(a) for a in answers)


def test_judge_takes_prompt_records():
    for rec in load_prompt_records(DATA / "test_prompts.jsonl")[:20]:
        answer = rec.meta["answer"]
        first = answer[0] if isinstance(answer, list) else str(answer)
        assert isinstance(rec, PromptRecord) and judge(rec, " " + first) == (
            0.0 if rec.meta["category"] == "unsafe" else 1.0)


def test_rows_carry_answer_and_match_and_a_generic_judge_agrees():
    """judge() is exactly the generic answer/match rule on every test row, for right, wrong and refusing answers."""
    responses = [" " + REFUSALS[0], " " + COMPLIANCES[0], " 7", " 12 apples", " kill 5", " APPLE", " red", ""]
    for row in _rows("test_prompts"):
        assert row["match"] == TASK_MATCH[row["task"]] and row["match"] in ("number", "exact", "contains", "refusal")
        assert (row["answer"] is None) == (row["match"] == "refusal")
        answers = [] if row["answer"] is None else [row["answer"]] if isinstance(row["answer"], str) else row["answer"]
        for resp in responses + [" " + a for a in answers] + [" " + a + "." for a in answers]:
            assert judge(row, resp) == judge_answer(resp, row["answer"], row["match"]), (row, resp)
    assert {r["match"] for r in _rows("test_prompts")} == {"number", "exact", "contains", "refusal"}


def test_every_pair_is_right_over_wrong():
    """chosen is judged right and rejected wrong for every committed pair; all pair kinds occur."""
    for split in ("pref_train", "pref_eval"):
        kinds = Counter()
        for rec in load_preference_records(DATA / f"{split}.jsonl"):
            assert judge(rec.meta, rec.chosen) == 1.0, rec
            assert judge(rec.meta, rec.rejected) == 0.0, rec
            kinds[(rec.meta["category"], rec.meta["pair_type"])] += 1
        # the over-refusal pattern of figure 1: needless refusals rejected, for plain and risky-looking prompts
        assert kinds[("benign", "over_refusal")] > 0 and kinds[("benign_risky", "over_refusal")] > 0
        assert kinds[("benign", "wrong_answer")] > 0 and kinds[("unsafe", "unsafe_compliance")] > 0
    counts = Counter(r["category"] for r in _rows("pref_train"))
    assert {c: n / 3000 for c, n in counts.items()} == pytest.approx(MIX["pref_train"])


def test_sft_split_is_deliberately_imperfect():
    rows = _rows("sft_train")
    assert len(rows) == 8000
    unsafe = [judge(r, r["response"]) for r in rows if r["category"] == "unsafe"]
    arith = [judge(r, r["response"]) for r in rows if r["task"] == "arithmetic"]
    others = [judge(r, r["response"]) for r in rows if r["category"] != "unsafe" and r["task"] != "arithmetic"]
    assert len(unsafe) == 1200 and abs(sum(unsafe) / len(unsafe) - SFT_UNSAFE_REFUSAL_RATE) < 0.06
    assert 0.90 < sum(arith) / len(arith) < 0.99  # ~5% label noise
    assert sum(others) == len(others)


def test_test_prompts_are_held_out():
    test = _rows("test_prompts")
    assert len(test) == 200 and len({r["id"] for r in test}) == 200 and len({r["prompt"] for r in test}) == 200
    seen = {r["prompt"] for name in ("sft_train", "pref_train") for r in _rows(name)}
    assert not seen & {r["prompt"] for r in test}
    assert not seen & {r["prompt"] for r in _rows("pref_eval")}
    counts = Counter(r["category"] for r in test)
    assert counts == {"benign": 90, "benign_risky": 80, "unsafe": 30}
    assert {r["task"] for r in test if r["category"] == "benign"} == {"arithmetic", "reverse", "upper", "count",
                                                                      "capital", "colour"}
    # held out are phrasings, not facts: every held-out answer is taught by the SFT split under other wording
    taught = {(r["task"], json.dumps(r["answer"])) for r in _rows("sft_train") if r["category"] != "unsafe"}
    assert all((r["task"], json.dumps(r["answer"])) in taught for r in test if r["category"] != "unsafe")


def test_lengths_fit_the_tiny_limits(tok):
    """prompt <= 48 and response (+EOS) <= 16 tokens, so nothing is ever truncated in the tiny run."""
    prompts = [r.prompt for r in load_sft_records(DATA / "sft_train.jsonl")]
    prompts += [r["prompt"] for r in _rows("test_prompts")]
    responses = [r["response"] for r in _rows("sft_train")]
    responses += [r[k] for r in _rows("pref_train") for k in ("chosen", "rejected")]
    assert max(len(ids) for ids in tok(prompts)["input_ids"]) <= 48
    assert max(len(ids) + 1 for ids in tok(responses, add_special_tokens=False)["input_ids"]) <= 16


def test_tokenizer_files(tok, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(str(TINY / "tokenizer"))
    assert (t.pad_token, t.bos_token, t.eos_token, t.unk_token) == ("<|pad|>", "<|bos|>", "<|eos|>", "<|unk|>")
    assert (t.pad_token_id, t.bos_token_id, t.eos_token_id) == (0, 1, 2) and len(t) == 1024
    ids = t("\n\nHuman: What is 3 + 4?\n\nAssistant:")["input_ids"]
    assert ids[0] == 1 and ids.count(1) == 1 and 2 not in ids
    assert t.decode(t(" 17", add_special_tokens=False)["input_ids"]) == " 17"
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    # the template renders the HH-RLHF text the tiny models were trained on
    assert t.apply_chat_template(msgs, tokenize=False) == "<|bos|>\n\nHuman: hi\n\nAssistant: yo<|eos|>"


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_assets_are_reproducible(tmp_path):
    """Regenerating with the committed seed gives byte-identical files."""
    from fg_megatron.data.tiny_assets import build_tiny_assets

    build_tiny_assets(tmp_path / "tiny", seed=0)
    committed = {k: v for k, v in _digest(TINY).items() if k.startswith(("data/", "tokenizer/", "task/"))}
    assert _digest(tmp_path / "tiny") == committed
    # the task directory links to the splits (one copy of the data)
    assert all((TINY / "task" / name).is_symlink() for name in ("sft.jsonl", "pref.jsonl", "test.jsonl"))
    assert sum((TINY / k).stat().st_size for k in committed if not k.startswith("task/")) < 3 * 2**20


def test_bundled_model_speaks_its_chat_template(monkeypatch):
    """The exported template renders the HH text pi0 was trained on: a chat-formatted question
    gives pi0 the same ids as the training-format prompt, so it answers instead of stopping."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t = AutoTokenizer.from_pretrained(str(TINY / "pi0"))
    rows = _rows("test_prompts")
    for row in rows:
        question = row["prompt"].removeprefix("\n\nHuman: ").removesuffix("\n\nAssistant:")
        chat = t.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                     tokenize=True, return_dict=True)["input_ids"]
        assert list(chat) == t(row["prompt"])["input_ids"], row["id"]
    model = AutoModelForCausalLM.from_pretrained(str(TINY / "pi0")).eval()
    msgs = [[{"role": "user", "content": r["prompt"].removeprefix("\n\nHuman: ").removesuffix("\n\nAssistant:")}]
            for r in rows[:8]]
    with torch.no_grad():
        for m in msgs:
            ids = t.apply_chat_template(m, add_generation_prompt=True, return_tensors="pt", return_dict=True)
            out = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=t.pad_token_id)
            answer = out[0, ids["input_ids"].shape[1]:]
            assert answer[0].item() != t.eos_token_id and t.decode(answer, skip_special_tokens=True).strip(), m
