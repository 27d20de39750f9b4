"""The public Python API: ventoux.load(...) -> LLM.

    llm = ventoux.load("./Mistral-7B-Instruct-v0.3", dtype="bfloat16")
    llm.generate("Hello", max_tokens=20).text
    llm.generate(["a", "b"], max_tokens=20)            # one batch -> list[Completion]
    for ev in llm.stream("Hello"): print(ev.text, end="")
    llm.chat([{"role": "user", "content": "Hi!"}], safe_prompt=True).text
    llm = ventoux.load(compile=True)                    # torch.compile the decode step (see compile_decode)
    with llm.engine(max_batch=8) as engine:             # continuous batching for many callers (engine.py)
        for ev in engine.submit(ids, SamplingParams(max_tokens=20)): ...
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from . import generate as gen
from .errors import VentouxError
from .lora import check_adapter
from .sampling import SamplingParams

DEMO_MODEL = Path(__file__).parent / "assets" / "demo"


def pick_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda", "mps"):  # torch also names meta, xla, ...: ventoux runs on none
        raise VentouxError(f"unknown device {device!r}: use auto, cpu, cuda, cuda:N or mps")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise VentouxError(f"device {device!r} asked for but CUDA is not available here: use --device cpu")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise VentouxError(f"device {device!r} asked for but MPS is not available here: use --device cpu")
    return dev


def compile_decode(model):
    """The decode step through torch.compile: one token per row, static shapes (the cache is preallocated), so
    it compiles once per batch size. CUDA adds CUDA graphs ("reduce-overhead"): a step then costs one launch.
    On a CPU it removes Python and small-op overhead, which matters for small models; a large model's step is
    bound by reading its weights either way. The first call compiles (tens of seconds)."""
    mode = "reduce-overhead" if model.device.type == "cuda" else None
    return torch.compile(model, dynamic=False, mode=mode)


class LLM:
    def __init__(self, model, tokenizer, source: str, compile: bool = False):
        self.model, self.tokenizer, self.source = model, tokenizer, source
        self.config = model.config
        self.decode = compile_decode(model) if compile else None

    # ---- prompts -> token ids ----------------------------------------------------------------
    def _ids(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise VentouxError("the prompt is empty: give some text to continue")
            return self.tokenizer.encode(prompt, bos=True)
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
            return list(prompt)
        raise VentouxError("prompt must be a string or a list of token ids")

    def _batch(self, prompt, kwargs) -> tuple[list[list[int]], list[SamplingParams], bool]:
        unknown = set(kwargs) - SamplingParams.names()
        if unknown:
            raise VentouxError(f"unknown generation parameter(s) {sorted(unknown)}; valid: "
                               f"{sorted(SamplingParams.names())}")
        if not isinstance(prompt, (str, list, tuple)):
            raise VentouxError(f"prompt must be a string, a list of token ids, or a list of those; not "
                               f"{type(prompt).__name__}")
        single = isinstance(prompt, str) or (isinstance(prompt, (list, tuple)) and prompt
                                             and all(isinstance(t, int) for t in prompt))
        prompts = [prompt] if single else list(prompt)
        params = SamplingParams(**kwargs)
        return [self._ids(p) for p in prompts], [params] * len(prompts), single

    # ---- generation ----------------------------------------------------------------------------
    def generate(self, prompt, adapter: str | None = None, **kwargs):
        """A str or token list -> Completion; a list of prompts -> list[Completion] (one batch).
        adapter: a LoRA adapter loaded with load(..., lora={name: path}) (None: the always-on one, if any)."""
        ids, params, single = self._batch(prompt, kwargs)
        out = gen.generate(self.model, self.tokenizer, ids, params, self.decode, [adapter] * len(ids))
        return out[0] if single else out

    def stream(self, prompt, adapter: str | None = None, **kwargs) -> Iterator[gen.Event]:
        ids, params, _ = self._batch(prompt, kwargs)
        check_adapter(self.model, adapter)  # at the call: the stream itself runs only once iterated
        return gen.stream(self.model, self.tokenizer, ids, params, self.decode, [adapter] * len(ids))

    def chat(self, messages: list[dict], safe_prompt: bool = False, **kwargs) -> gen.Completion:
        return self.generate(self.tokenizer.encode_chat(messages, safe_prompt=safe_prompt), **kwargs)

    def chat_stream(self, messages: list[dict], safe_prompt: bool = False, **kwargs) -> Iterator[gen.Event]:
        return self.stream(self.tokenizer.encode_chat(messages, safe_prompt=safe_prompt), **kwargs)

    def engine(self, max_batch: int = 8, kv_cache_bytes: int | None = None, max_queue: int | None = None,
               prefill_budget: int | None = None, prefix_cache: bool = True):
        """A serving engine on this model (its own thread; see engine.py): submit() requests, iterate handles.
        Run one engine per model at a time: generate()/stream() meanwhile would run the model in two threads."""
        from .engine import Engine

        return Engine(self.model, self.tokenizer, max_batch=max_batch, kv_cache_bytes=kv_cache_bytes,
                      max_queue=max_queue, prefill_budget=prefill_budget, decode=self.decode,
                      prefix_cache=prefix_cache)


def load(source=None, dtype=None, device=None, quantize=None, compile: bool = False, lora=None,
         mmap: bool = True) -> LLM:
    """lora: an adapter folder (PEFT's, or mistral-finetune's lora.safetensors), always on; or {name: path},
    several adapters on one base, each request choosing one (generate(..., adapter=name)). mmap=False: the weights
    copied into memory, off their files' maps (weights.into_memory)."""
    from .config import PRESETS, read_config
    from .hub import resolve
    from .tokenizer import load_tokenizer
    from .weights import into_memory, parse_dtype

    if source is None:
        if not (DEMO_MODEL / "config.json").exists():
            raise VentouxError("the demonstration model is not shipped in this build yet: pass --model "
                               "with a checkpoint folder or a Hugging Face repo id")
        folder = DEMO_MODEL
    else:  # a preset name ("mistral-7b-instruct-v0.3") stands for its repo id
        folder = resolve(PRESETS[source].repo_id if source in PRESETS else source)
    dev = pick_device(device)
    config = read_config(folder)
    model = load_model(folder, config, parse_dtype(dtype, dev), dev, quantize=quantize, lora=lora)
    if not mmap:
        into_memory(model)
    model.eval()
    return LLM(model, load_tokenizer(folder), str(source or folder), compile=compile)


def load_model(folder, config, dtype: torch.dtype | None, device="cpu", quantize=None, lora=None,
               transform=None) -> torch.nn.Module:
    """The loading pipeline, one step a call (as gpt-fast's _load_model). quantize: "int8", "int4-g64",
    "int4+output", ... (a quantized checkpoint loads as saved); lora: see load(); transform(name, module):
    a per-module hook while reading (weights.load_weights)."""
    from .fastattention import use_attention_kernel
    from .fastblock import use_block_kernel
    from .fastlinear import use_cpu_kernels
    from .fastnorm import use_norm_kernel
    from .fusedproducts import fuse_shared_inputs
    from .lora_files import load_adapter
    from .model import Transformer
    from .quantize import prepare_load
    from .weights import load_weights

    with torch.device("meta"):  # 1. the skeleton: shapes only, no memory
        model = Transformer(config)
    model, transform = prepare_load(model, folder, quantize, transform)  # 2. quantized layers, or a hook per linear
    model = load_weights(model, folder, dtype, device, transform)  # 3. the weights, streamed module by module
    use_cpu_kernels(model)  # 4. 16-bit linears on a CPU run on ventoux's kernels
    use_attention_kernel(model)  # and decoding's attention
    use_norm_kernel(model)  # and its norms
    fuse_shared_inputs(model)  # quantized products that read one input: one call
    use_block_kernel(model)  # and a decode step's blocks whose parts are all on kernels: one call each
    always_on = isinstance(lora, (str, Path))
    adapters = {"default": lora} if always_on else dict(lora or {})
    for name, path in adapters.items():  # 5. LoRA: one adapter always on, or several chosen per request
        load_adapter(model, path, name=name, activate=always_on)
    return model
