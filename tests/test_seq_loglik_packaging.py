"""kernels/ ships as the package ``fg_megatron_kernels`` and never as ``kernels``
(the PyPI package of that name, which transformers probes, must not be shadowed)."""

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_pyproject_lists_every_package():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert cfg["package-dir"] == {"fg_megatron_kernels": "kernels"}
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "fg_megatron").rglob("__init__.py")}
    missing = found - set(cfg["packages"])
    assert not missing, f"add {sorted(missing)} to [tool.setuptools] packages in pyproject.toml"
    assert "fg_megatron_kernels" in cfg["packages"]
    assert not (ROOT / "kernels" / "__init__.py").exists()
    assert (ROOT / "kernels" / "seq_loglik.py").exists()


def test_transformers_imports_with_repo_root_on_path():
    """With the repo root on sys.path ``kernels`` resolves to our folder as a bare
    namespace package; transformers must neither break nor take it for the hub
    ``kernels`` package, and a Llama forward must run."""
    out = _run(
        "import sys; sys.path.insert(0, '.')\n"
        "import torch, transformers\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "from transformers.utils.import_utils import is_kernels_available\n"
        "cfg = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,\n"
        "                  num_attention_heads=2, num_key_value_heads=2)\n"
        "logits = LlamaForCausalLM(cfg)(torch.arange(6)[None]).logits\n"
        "print(is_kernels_available(), tuple(logits.shape))\n")
    assert out.strip() == "False (1, 6, 50)"


def test_kernels_are_an_ordinary_package():
    """fg_megatron imports ``fg_megatron_kernels`` like any installed package: no loading by
    file path, and the backends import nothing private (nor anything at all) from the
    dispatcher that loads them."""
    import ast

    for path in (ROOT / "fg_megatron").rglob("*.py"):
        text = path.read_text()
        assert "spec_from_file_location" not in text and "submodule_search_locations" not in text, path
    for name in ("seq_loglik_torch.py", "seq_loglik_triton.py"):
        tree = ast.parse((ROOT / "kernels" / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert node.module != "fg_megatron_kernels.seq_loglik", f"{name} imports back from the dispatcher"
                if node.module.startswith("fg_megatron_kernels"):
                    assert all(not a.name.startswith("_") for a in node.names), f"{name}: private import"
    out = _run("import fg_megatron.logprobs as lp, fg_megatron_kernels.seq_loglik as sl\n"
               "print(sl.__file__, lp.seq_loglik is sl.seq_loglik)\n")
    path, same = out.split()
    assert Path(path) == ROOT / "kernels" / "seq_loglik.py" and same == "True"
