"""Generation with megatron-core against transformers' ``generate``: greedy ids equal token for
token at TP=1, TP=2 and PP=2 (also with uneven stages) for a left-padded batch of different
prompt lengths (with and without the KV cache, and each prompt alone); sampling reproducible
across layouts and batch orders;
``tools/generate.py`` rows equal transformers' greedy responses."""

import json
import subprocess
import sys

import pytest
import torch

from dist_utils import ROOT, tool_error, torchrun, torchrun_json

TOKENIZER = ROOT / "assets/tiny/tokenizer"
MAX_NEW = 12


def hf_greedy(model, prompts, max_new_tokens, eos_id, pad_id=0):
    """transformers' greedy generate on a left-padded batch; each row cut after its first EOS."""
    s = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), s), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, s - len(p):] = torch.tensor(p)
        mask[i, s - len(p):] = 1
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                             eos_token_id=eos_id, pad_token_id=pad_id)
    rows = []
    for row in out[:, s:].tolist():
        rows.append(row[: row.index(eos_id) + 1] if eos_id in row else row)
    return rows


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random Llama (vocab 1100: padded to 1280 at TP=2) with the tiny tokenizer, its prompts
    (lengths 3..17), and an EOS id that greedy decoding reaches mid-response for some rows."""
    return _tiny_llama(tmp_path_factory.mktemp("gen"), num_layers=2)


def _tiny_llama(tmp, num_layers: int):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(TOKENIZER))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1100, hidden_size=64, intermediate_size=96, num_hidden_layers=num_layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      initializer_range=0.2, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    model_dir = tmp / "model"
    model.save_pretrained(model_dir, safe_serialization=True)
    tok.save_pretrained(model_dir)
    g = torch.Generator().manual_seed(3)
    prompts = [[1] + torch.randint(3, 1000, (n - 1,), generator=g).tolist() for n in (3, 17, 9, 6, 12)]
    free = hf_greedy(model, prompts, MAX_NEW, eos_id=None)
    eos = free[1][4]  # row 1 stops at its 5th token; other rows may or may not meet it
    return model, model_dir, prompts, eos, tok


@pytest.mark.distributed
def test_generate_ids_match_transformers_tp_pp(tiny, tmp_path):
    model, model_dir, prompts, eos, _ = tiny
    expected = hf_greedy(model, prompts, MAX_NEW, eos_id=eos)
    assert len(expected[1]) == 5 and expected[1][-1] == eos
    assert any(len(r) == MAX_NEW and eos not in r for r in expected)  # some rows run to the length limit
    (tmp_path / "p.json").write_text(json.dumps(prompts))
    res = torchrun_json("generation_parity.py", 2, "--load", model_dir, "--prompts", tmp_path / "p.json",
                        "--eos", str(eos), "--max-new-tokens", str(MAX_NEW), out=tmp_path / "r.json")
    for name, r in res.items():
        assert r["cached"] == expected, name
        assert r["nocache"] == expected, name
        assert r["scheduled"] == expected, name
        assert r["alone"] == expected, name  # left padding changes nothing
        assert r["finish"] == ["eos" if row[-1] == eos else "length" for row in expected], name
        assert r["sampled_reversed"] == r["sampled"]["1"], name
        assert r["sampled"]["1"] != r["sampled"]["2"], name
        assert r["sampled"]["1"] != expected, name
    for name in ("tp2", "pp2"):
        assert res[name]["sampled"] == res["tp1"]["sampled"], name


@pytest.mark.distributed
def test_generate_ids_match_transformers_uneven_pp(tmp_path):
    """3 layers at PP=2 (stages of 2 and 1 layers): megatron-core's KV cache, keyed by the
    model-wide layer number, and the schedule give transformers' greedy ids."""
    model, model_dir, prompts, eos, _ = _tiny_llama(tmp_path, num_layers=3)
    expected = hf_greedy(model, prompts, MAX_NEW, eos_id=eos)
    (tmp_path / "p.json").write_text(json.dumps(prompts))
    res = torchrun_json("generation_parity.py", 2, "--load", model_dir, "--prompts", tmp_path / "p.json",
                        "--eos", str(eos), "--max-new-tokens", str(MAX_NEW), "--layouts", "pp2",
                        out=tmp_path / "r.json")
    r = res["pp2"]
    assert r["cached"] == expected and r["scheduled"] == expected
    assert r["nocache"] == expected and r["alone"] == expected
    assert r["finish"] == ["eos" if row[-1] == eos else "length" for row in expected]
    assert r["sampled_reversed"] == r["sampled"]["1"]


@pytest.mark.distributed
def test_generate_tool_rows(tiny, tmp_path):
    """tools/generate.py at TP=2: the input rows carried through in order, text and ids equal to
    transformers' greedy output (tokenised like training: BOS + prompt), EOS excluded from the text."""
    from fg_megatron.data.tokenize import tokenize_prompts

    model, model_dir, _, _, tok = tiny
    rows = [{"id": "a", "prompt": "\n\nHuman: What is 3 + 4?\n\nAssistant:", "category": "benign"},
            {"prompt": "\n\nHuman: Reverse the word cat.\n\nAssistant:"},
            {"id": 7, "prompt": "Hi"}]
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    torchrun(ROOT / "tools/generate.py", 2, "--load", model_dir, "--tp", "2", "--prompts", data, "--out", out,
             "--max-new-tokens", "6", "--batch-size", "2")
    got = [json.loads(line) for line in out.read_text().splitlines()]
    ids = tokenize_prompts(tok, [r["prompt"] for r in rows], 64 - 6)
    # vocabulary 1100 > tokenizer's 1024: generation must not emit EOS by chance for this check
    expected = hf_greedy(model, [list(p) for p in ids], 6, eos_id=tok.eos_token_id)
    assert len(got) == len(rows)
    for row, g, e in zip(rows, got, expected):
        assert {k: g[k] for k in row} == row
        assert g["response_ids"] == e
        assert g["finish_reason"] == ("eos" if e[-1] == tok.eos_token_id else "length")
        text_ids = [t for t in e if t != tok.eos_token_id and t < len(tok)]
        assert g["response"] == tok.decode(text_ids, skip_special_tokens=True)


def test_generate_tool_rejects_bad_temperature(tiny, tmp_path):
    _, model_dir, _, _, _ = tiny
    data = tmp_path / "in.jsonl"
    data.write_text(json.dumps({"prompt": "x"}) + "\n")
    proc = subprocess.run([sys.executable, str(ROOT / "tools/generate.py"), "--load", str(model_dir), "--prompts",
                           str(data), "--out", str(tmp_path / "o.jsonl"), "--temperature", "-1"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "temperature" in last and "-1" in last
    assert not (tmp_path / "o.jsonl").exists()


def test_generate_tool_prompt_ids_rows(tiny, tmp_path):
    """Pre-tokenised rows: generated from their prompt_ids exactly as given (no BOS added); the
    output keeps prompt_ids and adds the response; a row's old response_ids (generate's own output
    fed back in) are replaced."""
    model, model_dir, prompts, _, tok = tiny
    rows = [{"id": "a", "prompt_ids": prompts[0]},
            {"id": "b", "prompt": "shown only", "prompt_ids": prompts[2][1:], "response_ids": [5, 6]}]
    data = tmp_path / "ids.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    proc = subprocess.run([sys.executable, str(ROOT / "tools/generate.py"), "--load", str(model_dir), "--prompts",
                           str(data), "--out", str(out), "--max-new-tokens", "6"], capture_output=True, text=True,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = [json.loads(line) for line in out.read_text().splitlines()]
    expected = hf_greedy(model, [rows[0]["prompt_ids"], rows[1]["prompt_ids"]], 6, eos_id=tok.eos_token_id)
    for row, g, e in zip(rows, got, expected):
        assert g["id"] == row["id"] and g["prompt_ids"] == row["prompt_ids"]
        assert g["response_ids"] == e
        text_ids = [t for t in e if t != tok.eos_token_id and t < len(tok)]
        assert g["response"] == tok.decode(text_ids, skip_special_tokens=True)
    assert got[1]["prompt"] == "shown only"


@pytest.mark.parametrize("case", ["surrogate", "directory", "out_under_a_file"])
def test_generate_tool_bad_input_is_one_line_error(tiny, tmp_path, case):
    _, model_dir, _, _, _ = tiny
    data, out = tmp_path / "in.jsonl", tmp_path / "o.jsonl"
    data.write_text('{"prompt": "ok"}\n{"prompt": "half a pair: \\udc00"}\n')
    if case == "directory":
        data = tmp_path
    if case == "out_under_a_file":
        data.write_text('{"prompt": "ok"}\n')
        out = data / "o.jsonl"
    line = tool_error(ROOT / "tools/generate.py", "--load", model_dir, "--prompts", data, "--out", out,
                      "--max-new-tokens", "4")
    expected = {"surrogate": f"error: {data}:2: field 'prompt': lone UTF-16 surrogate \\udc00",
                "directory": f"error: {tmp_path}: is a directory; expected a data file",
                "out_under_a_file": f"error: --out {out}: cannot be written: {data} is a file, not a directory"}[case]
    assert line.startswith(expected), line
    assert not (tmp_path / "o.jsonl").exists()
