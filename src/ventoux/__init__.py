"""ventoux: a small, exact and fast engine for the Mistral 7B model family.

    import ventoux
    llm = ventoux.load("mistralai/Mistral-7B-Instruct-v0.3")   # or a folder; no argument: the demo model
    print(llm.generate("The capital of France is", max_tokens=16).text)
    for event in llm.stream("Once upon a time"):
        print(event.text, end="", flush=True)
"""

from .errors import VentouxError

__all__ = ["VentouxError", "load"]
__version__ = "0.1.0"


def load(source=None, dtype=None, device=None, quantize=None, compile=False, lora=None, mmap=True):
    """Load a model: a checkpoint folder (HF or Mistral layout), a Hugging Face repo id, or None for the
    shipped demonstration model. quantize: "int8", "int4", "int4-g64", ... (the head in int8; +output: in the
    blocks' scheme); compile: torch.compile the decode step; lora: a LoRA adapter folder (always on) or {name: folder}
    (chosen per request: generate(..., adapter=name)); mmap=False: the weights copied into memory, off their files'
    maps (llama.cpp's --no-mmap: a bf16 model decodes faster, loads slower). Returns an LLM (see api.py)."""
    from .api import load as _load

    return _load(source, dtype=dtype, device=device, quantize=quantize, compile=compile, lora=lora, mmap=mmap)
