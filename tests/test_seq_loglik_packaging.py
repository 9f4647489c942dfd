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


def test_kernels_load_from_a_bare_source_tree():
    """Without the editable install's finder, fg_megatron.logprobs maps the folder itself."""
    out = _run(
        "import sys; sys.path.insert(0, '.')\n"
        # hide `pip install -e`: its meta-path finder and its namespace path hook
        "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in getattr(f, '__module__', '')]\n"
        "sys.path[:] = [p for p in sys.path if '__editable__' not in p]\n"
        "sys.path_importer_cache.clear()\n"
        "import importlib.util\n"
        "assert importlib.util.find_spec('fg_megatron_kernels') is None\n"
        "from fg_megatron.logprobs import kernels_module\n"
        "m = kernels_module()\n"
        "from fg_megatron_kernels import seq_loglik_torch\n"
        "print(m.__name__, m.__file__, seq_loglik_torch.__file__)\n")
    name, path, torch_path = out.split()
    assert name == "fg_megatron_kernels.seq_loglik"
    assert Path(path) == ROOT / "kernels" / "seq_loglik.py" and Path(torch_path).parent == ROOT / "kernels"
