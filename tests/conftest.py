"""Shared fixtures: tiny random Mistral models, in transformers and in ventoux, with equal weights."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import mistral_common
import pytest
import torch
import tqdm

from ventoux.config import ModelConfig
from ventoux.model import Transformer
from ventoux.names import from_hf

# tqdm shares a multiprocessing lock between processes and runs a monitor thread: a process forked from this one
# (mutmut forks one per mutant) that is killed holding the lock, or forked while the monitor holds it, hangs every
# later one at its first progress bar. The tests' bars take a lock of their own process, and no monitor.
tqdm.tqdm.set_lock(threading.RLock())
tqdm.tqdm.monitor_interval = 0

TINY = ModelConfig(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, hidden_dim=160, vocab_size=211,
                   head_dim=16, norm_eps=1e-5, rope_theta=10000.0, sliding_window=8, max_seq_len=256)
TINY_FULL = TINY.replace(sliding_window=None, rope_theta=1e6, max_seq_len=96)
V1 = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"  # Mistral's real v1 tokenizer (32000)


@pytest.fixture(scope="session")
def v1_tokenizer(tmp_path_factory):
    from ventoux.tokenizer import load_tokenizer

    folder = tmp_path_factory.mktemp("v1")
    shutil.copy(V1, folder / "tokenizer.model.v1")
    return load_tokenizer(folder)


@pytest.fixture(scope="module")
def one_thread():
    """One thread for a module: tiny models run faster so, and a test's subprocesses compute alike."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def hf_model(cfg: ModelConfig, seed: int = 0):
    """A random transformers.MistralForCausalLM with the given shape (eager attention: the reference)."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    hf_cfg = MistralConfig(**cfg.to_hf(), attn_implementation="eager")
    model = MistralForCausalLM(hf_cfg).eval()
    with torch.no_grad():  # norms are ones at init: randomise them so they are tested too
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def engine_model(cfg: ModelConfig, seed: int, dtype: torch.dtype = torch.float32) -> Transformer:
    """A tiny ventoux model with the real tokenizers' vocabulary whose greedy tokens depend on every key (its norms
    perturbed): the engine's tests compare token sequences, which a plain random init makes too uniform."""
    torch.manual_seed(seed)
    model = Transformer(cfg.replace(vocab_size=32000)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.to(dtype)


def adapter_model(seed: int = 5) -> Transformer:
    """engine_model(TINY) with one adapter, "a", random (a fresh B = 0 would change nothing) and not active:
    requests choose it by name, None is the base."""
    from ventoux import lora

    model = engine_model(TINY, seed)
    lora.add_adapter(model, lora.LoraConfig(rank=4, alpha=8), name="a", activate=False)
    return randomize_adapters(model, scale=0.3, seed=1, name="a")


def randomize_adapters(model, scale: float = 0.05, seed: int = 1, name: str | None = None):
    """Give the adapters (or adapter `name`) random tensors: a fresh B = 0 would hide any layout mistake."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, p in model.named_parameters():
            if ".adapters." in key and (name is None or f".adapters.{name}." in key):
                p.copy_(scale * torch.randn(p.shape, generator=gen))
    return model


def random_ids(seed: int, n: int) -> list[int]:
    """n token ids of the 32000-token vocabulary (none of the specials 0-2), the same for the same seed."""
    return torch.randint(3, 32000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def error_message(kind: type[Exception], fn, *args, **kw) -> str:
    """The message of the `kind` error fn(*args, **kw) raises; the test fails if it raises none."""
    with pytest.raises(kind) as e:
        fn(*args, **kw)
    return str(e.value)


def ventoux_from_hf(hf) -> Transformer:
    cfg = ModelConfig.from_hf(hf.config.to_dict())
    model = Transformer(cfg).eval()
    model.load_state_dict({from_hf(k): v for k, v in hf.state_dict().items()})
    return model


@pytest.fixture(params=["windowed", "full"])
def pair(request):
    cfg = TINY if request.param == "windowed" else TINY_FULL
    hf = hf_model(cfg)
    return hf, ventoux_from_hf(hf)


# ---- ventoux's CPU kernels -----------------------------------------------------------------------------
def _kernel_isas() -> list[str]:
    from ventoux import cpu_kernels

    return cpu_kernels.supported_isas() if cpu_kernels.compiler() else []


KERNEL_ISAS = _kernel_isas()  # every build of ventoux's CPU kernels this machine must run (cpu_kernels.py)
NO_KERNELS = pytest.mark.skip(reason="no x86 CPU with AVX2 or AVX-512 VNNI, or no C compiler: the kernels cannot build")


@pytest.fixture(params=KERNEL_ISAS or [pytest.param(None, marks=NO_KERNELS)])
def kernel_isa(request, monkeypatch):
    """Runs the test under each kernel build (VENTOUX_CPU_ISA); where a build should work, it must."""
    from ventoux import cpu_kernels

    monkeypatch.setenv(cpu_kernels.ISA_VARIABLE, request.param)
    assert cpu_kernels.library() is not None, f"the {request.param} CPU kernels must build and load on this CPU"
    return request.param

