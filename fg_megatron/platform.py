"""Where we run: CUDA or CPU, and the one place that adapts megatron-core to CPU.

megatron-core assumes CUDA in a few hundred places: it asks
``torch.cuda.current_device()`` for the device of buffers it creates (rotary
``inv_freq``, pipeline receive buffers, attention masks), writes
``device="cuda"`` literally (schedules' token counter, the sliding-window mask,
grad-norm buffers), calls ``torch.cuda.synchronize()`` around p2p, and keeps
its tensor-parallel RNG streams as CUDA generator states.

Rather than patching those call sites one by one, :func:`adapt_megatron_for_cpu`
gives every loaded ``megatron.core`` module a *view* of ``torch`` in which the
CUDA device means the CPU (``_CpuTorch``), and installs an RNG-states tracker
that forks the CPU generator.  Real ``torch`` is untouched for everybody else
(transformers, our own code).  Nothing is done when CUDA is available.

Targets megatron-core ``MEGATRON_CORE_VERSION`` exactly; ``tests/test_platform.py``
checks each adaptation (device queries, literal ``"cuda"``, RNG tracker, p2p
sync, schedule token counter).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import sys
import types
import warnings
from typing import Any, Iterator

import torch

MEGATRON_CORE_VERSION = "0.16.1"

# Without a GPU these megatron-core import-time notices say nothing actionable
# (Transformer Engine / Apex are GPU-only; the CUDA connection hint is for GPUs).
_CPU_NOISE = (
    r".*Transformer Engine and Apex are not installed.*",
    r"Apex is not installed\. Falling back to Torch Norm",
    r"full scope is deprecated\..*",
    r"When using async grad allreduce it is recommended to set the environment variable CUDA_DEVICE_MAX_CONNECTIONS.*",
)
if not torch.cuda.is_available():
    for _pattern in _CPU_NOISE:
        warnings.filterwarnings("ignore", message=_pattern)

# megatron-core modules the trainer touches; all are imported before the
# adaptation so each one receives the CPU view of torch.
_MEGATRON_MODULES = (
    "megatron.core.parallel_state",
    "megatron.core.utils",
    "megatron.core.tensor_parallel.random",
    "megatron.core.tensor_parallel.layers",
    "megatron.core.tensor_parallel.mappings",
    "megatron.core.tensor_parallel.cross_entropy",
    "megatron.core.transformer.utils",
    "megatron.core.transformer.attention",
    "megatron.core.transformer.dot_product_attention",
    "megatron.core.transformer.transformer_block",
    "megatron.core.transformer.transformer_layer",
    "megatron.core.transformer.mlp",
    "megatron.core.transformer.torch_norm",
    "megatron.core.fusions.fused_softmax",
    "megatron.core.models.common.embeddings.rotary_pos_embedding",
    "megatron.core.models.common.embeddings.rope_utils",
    "megatron.core.models.common.embeddings.language_model_embedding",
    "megatron.core.models.common.language_module.language_module",
    "megatron.core.models.gpt.gpt_model",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.distributed.finalize_model_grads",
    "megatron.core.optimizer",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.optimizer_param_scheduler",
)

_FACTORIES = (
    "empty", "zeros", "ones", "full", "tensor", "arange", "rand", "randn",
    "randint", "randperm", "as_tensor", "linspace", "eye", "empty_strided",
)


def cuda_available() -> bool:
    return torch.cuda.is_available()


def default_device() -> torch.device:
    """The device models and batches live on in this process."""
    if cuda_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _cpu_device(device: Any) -> Any:
    if device is None:
        return None
    if isinstance(device, int):
        return "cpu"
    if isinstance(device, str) and device.startswith("cuda"):
        return "cpu"
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    return device


def _redirect_device(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        kwargs.pop("pin_memory", None)
        return fn(*args, **kwargs)

    return wrapper


class _NullStream:
    """Stands in for a CUDA stream: every operation is already ordered on CPU."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def record_event(self, *args, **kwargs):
        return None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _CpuCuda(types.SimpleNamespace):
    """``torch.cuda`` as megatron-core sees it on CPU."""

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)


def _make_cpu_cuda() -> _CpuCuda:
    nvtx = types.SimpleNamespace(range_push=lambda *a, **k: None, range_pop=lambda *a, **k: None)
    return _CpuCuda(
        is_available=lambda: False,
        current_device=lambda: "cpu",
        device_count=lambda: 0,
        synchronize=lambda *a, **k: None,
        get_rng_state=lambda *a, **k: torch.get_rng_state(),
        set_rng_state=lambda state, *a, **k: torch.set_rng_state(state),
        manual_seed=lambda seed: torch.manual_seed(seed),
        manual_seed_all=lambda seed: torch.manual_seed(seed),
        memory_allocated=lambda *a, **k: 0,
        max_memory_allocated=lambda *a, **k: 0,
        memory_reserved=lambda *a, **k: 0,
        empty_cache=lambda: None,
        Stream=_NullStream,
        current_stream=lambda *a, **k: _NullStream(),
        stream=lambda *a, **k: contextlib.nullcontext(),
        nvtx=nvtx,
        random=types.SimpleNamespace(
            get_rng_state=lambda *a, **k: torch.get_rng_state(),
            set_rng_state=lambda state, *a, **k: torch.set_rng_state(state),
        ),
    )


class _CpuTorch(types.ModuleType):
    """The ``torch`` module as megatron-core sees it on CPU: identical except that
    the CUDA device means the CPU device."""

    def __init__(self) -> None:
        super().__init__("torch")
        self.cuda = _make_cpu_cuda()
        for name in _FACTORIES:
            setattr(self, name, _redirect_device(getattr(torch, name)))

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


class CpuRNGStatesTracker:
    """megatron-core's ``CudaRNGStatesTracker`` over the CPU generator.

    Attention forks the tensor-parallel RNG stream even with dropout 0, so a
    tracker must exist; on CPU the named streams are states of the CPU generator.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()
        self._is_initialized = False

    def is_initialized(self) -> bool:
        return self._is_initialized

    def get_states(self) -> dict[str, torch.Tensor]:
        return dict(self.states_)

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self._is_initialized = True
        self.states_ = dict(states)

    def add(self, name: str, seed: int) -> None:
        self._is_initialized = True
        if seed in self.seeds_:
            raise ValueError(f"RNG seed {seed} already tracked")
        if name in self.states_:
            raise ValueError(f"RNG state {name!r} already tracked")
        self.seeds_.add(seed)
        outer = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(outer)

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng") -> Iterator[None]:
        if name not in self.states_:
            raise ValueError(f"RNG state {name!r} is not tracked")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


@contextlib.contextmanager
def _tensor_cuda_is_identity() -> Iterator[None]:
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.cuda = original


def _without_tensor_cuda(fn):
    """Run a megatron-core method with ``Tensor.cuda()`` meaning "stay on CPU"."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _tensor_cuda_is_identity():
            return fn(*args, **kwargs)

    wrapper.__fg_cpu_adapted__ = True
    return wrapper


# Methods that call ``tensor.cuda()`` on the paths we use (the tied embedding
# copy to the last pipeline stage).
_TENSOR_CUDA_METHODS = (
    ("megatron.core.models.common.language_module.language_module", "LanguageModule",
     "setup_embeddings_and_output_layer"),
)


@contextlib.contextmanager
def _tensor_type_names_cuda() -> Iterator[None]:
    original = torch.Tensor.type

    def cuda_type(self, *args, **kwargs):
        if args or kwargs:
            return original(self, *args, **kwargs)
        name = original(self)
        return name.replace("torch.", "torch.cuda.", 1) if self.device.type == "cpu" else name

    torch.Tensor.type = cuda_type
    try:
        yield
    finally:
        torch.Tensor.type = original


def _with_cuda_type_names(fn):
    """Run a megatron-core method with ``Tensor.type()`` naming CPU tensors as CUDA ones
    (``Float16OptimizerWithFloat16Params`` sorts parameters by ``torch.cuda.HalfTensor`` /
    ``torch.cuda.BFloat16Tensor`` / ``torch.cuda.FloatTensor`` and refuses anything else)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _tensor_type_names_cuda():
            return fn(*args, **kwargs)

    wrapper.__fg_cpu_adapted__ = True
    return wrapper


# Methods that check ``tensor.type()`` against CUDA type names: the fp16/bf16 optimizer.
_TENSOR_TYPE_METHODS = (
    ("megatron.core.optimizer.optimizer", "Float16OptimizerWithFloat16Params", "__init__"),
)

_ADAPTED = False


def adapt_megatron_for_cpu() -> bool:
    """Make megatron-core usable without CUDA. Idempotent; a no-op with CUDA.

    Returns True when the adaptation is (now) in place.
    """
    global _ADAPTED
    if cuda_available():
        return False
    if _ADAPTED:
        return True
    from megatron.core import package_info

    if package_info.__version__ != MEGATRON_CORE_VERSION:
        warnings.warn(
            f"fg_megatron's CPU adaptation targets megatron-core=={MEGATRON_CORE_VERSION}, "
            f"found {package_info.__version__}; install the pinned version "
            f"(pip install megatron-core=={MEGATRON_CORE_VERSION})",
            stacklevel=2,
        )
    with warnings.catch_warnings():
        # Missing Transformer Engine / Apex is expected on CPU.
        warnings.simplefilter("ignore")
        for name in _MEGATRON_MODULES:
            importlib.import_module(name)
    cpu_torch = _CpuTorch()
    for name, module in list(sys.modules.items()):
        if name.startswith("megatron.core") and getattr(module, "torch", None) is torch:
            module.torch = cpu_torch

    for module_name, cls_name, method in _TENSOR_CUDA_METHODS:
        cls = getattr(importlib.import_module(module_name), cls_name)
        setattr(cls, method, _without_tensor_cuda(getattr(cls, method)))
    for module_name, cls_name, method in _TENSOR_TYPE_METHODS:
        cls = getattr(importlib.import_module(module_name), cls_name)
        setattr(cls, method, _with_cuda_type_names(getattr(cls, method)))

    from megatron.core.tensor_parallel import random as mcore_random

    tracker = CpuRNGStatesTracker()
    mcore_random._CUDA_RNG_STATE_TRACKER = tracker
    mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    _ADAPTED = True
    return True


def seed_everything(seed: int, tp_rank: int) -> None:
    """Seed python/torch RNGs and megatron-core's tensor-parallel RNG streams.

    Replaces ``model_parallel_cuda_manual_seed`` (which asserts on CPU): the
    default stream gets ``seed``; the tensor-parallel stream ``seed + 2718 + tp_rank``
    as megatron-core does.
    """
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if cuda_available():
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(seed)
        return
    adapt_megatron_for_cpu()
    from megatron.core.tensor_parallel import random as mcore_random

    tracker = mcore_random._CUDA_RNG_STATE_TRACKER
    tracker.reset()
    tracker.add("data-parallel-rng", seed)
    tracker.add("model-parallel-rng", seed + 2718 + tp_rank)
    tracker.add("expert-parallel-rng", seed + 1024)


def is_transformer_engine_usable() -> bool:
    """Transformer Engine layer spec needs both the package and a GPU."""
    if not cuda_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except Exception:
        return False
    return True
