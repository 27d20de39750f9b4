"""One engine, measured in a process of its own: `python -m ventoux.bench.worker` reads a JSON spec
({"engine": Engine fields, "settings": Settings fields, "prompts": [[ids]]}) from stdin and prints one
line, RESULT_MARK + JSON: load time, bytes of non-embedding weights, peak RSS, and per timed run the
time to first token, the decode time after it and the tokens each sequence got.

Every engine is driven the same way: greedy decoding of the same prompts, every row decoding all its new
tokens whether the model ends its sequence or not, the first new token marks the end of prefill, the clock
stops at the last token.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time

from . import RESULT_MARK


def _timed(tokens_iter, new_tokens: int) -> dict:
    """Drive an iterator that yields one item per new token (per batch step); time it."""
    t0 = time.perf_counter()
    first, n = None, 0
    for _ in tokens_iter:
        n += 1
        if first is None:
            first = time.perf_counter()
        if n == new_tokens:
            break
    end = time.perf_counter()
    return {"ttft_s": first - t0, "decode_s": end - first, "tokens": n}


def _timed_run(runner, prompts, new_tokens: int) -> dict:
    """One timed generation, with how many cores other processes kept busy meanwhile."""
    busy0, ours0, t0 = busy_cpu_s(), _own_cpu_s(), time.perf_counter()
    run = runner.generate(prompts, new_tokens)
    if busy0 is not None:
        others = busy_cpu_s() - busy0 - (_own_cpu_s() - ours0)
        run["others_cores"] = max(0.0, others / (time.perf_counter() - t0))
    return run


def busy_cpu_s() -> float | None:
    """CPU seconds spent by the whole machine so far (Linux /proc/stat), to tell how busy the other
    processes kept the cores while we were timed: a shared machine makes every figure noise."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# ---- ventoux ---------------------------------------------------------------------------------------
class VentouxRunner:
    def __init__(self, engine: dict, settings: dict):
        import ventoux

        self.llm = ventoux.load(engine["path"], dtype=engine["dtype"], device=settings["device"],
                                quantize=engine["quantize"], compile=engine.get("compile", False),
                                lora=engine.get("lora"), mmap=engine.get("mmap", True))
        self.chunk = settings["prefill_chunk"]
        model = self.llm.model
        # Bytes read per decode step: every tensor but the embedding table, which is only indexed.
        # A quantized module's buffers (packed weights, scales) count with their real size.
        tensors = [*model.named_parameters(), *model.named_buffers()]
        self.weight_bytes = sum(t.numel() * t.element_size() for name, t in tensors
                                if not name.startswith("tok_embeddings."))

    def generate(self, prompts, new_tokens: int) -> dict:
        # ignore_eos: every row decodes new_tokens tokens, as the peers do (transformers' min_new_tokens,
        # llama.cpp's endless generate); a row that stopped early would leave the batch smaller than counted
        events = self.llm.stream(prompts, max_tokens=new_tokens, temperature=0.0, prefill_chunk=self.chunk,
                                 ignore_eos=True)
        return _timed(_steps(events), new_tokens)


def _steps(events):
    """Events (one per live sequence per step, in row order) -> one item per decode step."""
    prev = None
    for ev in events:
        if ev.token is None:  # a closing event that only flushes text
            continue
        if prev is None or ev.index <= prev:
            yield ev
        prev = ev.index


# ---- transformers ----------------------------------------------------------------------------------
class TransformersRunner:
    def __init__(self, engine: dict, settings: dict):
        import torch
        from transformers import MistralForCausalLM

        dtype = getattr(torch, engine["dtype"])
        self.model = MistralForCausalLM.from_pretrained(engine["path"], dtype=dtype).to(settings["device"]).eval()
        self.device = settings["device"]
        self.weight_bytes = sum(p.numel() * p.element_size() for n, p in self.model.named_parameters()
                                if "embed_tokens" not in n)

    def generate(self, prompts, new_tokens: int) -> dict:
        import torch

        ids = torch.tensor(prompts, device=self.device)
        clock = _Clock()
        with torch.inference_mode():
            t0 = time.perf_counter()
            # min_new_tokens: never stop early at EOS, so every run decodes the same number of tokens
            self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                min_new_tokens=new_tokens, do_sample=False, streamer=clock, pad_token_id=0)
        first, end = clock.times[1], clock.times[-1]  # times[0]: the prompt, put before prefill
        return {"ttft_s": first - t0, "decode_s": end - first, "tokens": len(clock.times) - 1}


class _Clock:
    """A transformers streamer that only notes when each step's tokens arrive."""

    def __init__(self):
        self.times = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


# ---- llama.cpp -------------------------------------------------------------------------------------
class LlamaCppRunner:
    def __init__(self, engine: dict, settings: dict):
        from . import llamacpp

        llamacpp.use(llamacpp.install_dir(llamacpp.build_for(engine.get("isa"))))
        from llama_cpp import Llama

        from .llamacpp import gguf_weight_bytes

        self.system_info = llamacpp.system_info()

        threads = settings["threads"]
        n_ctx = settings["prompt_len"] + settings["new_tokens"] + 8
        self.llm = Llama(model_path=engine["path"], n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                         use_mmap=engine.get("mmap", True), verbose=False)
        self.weight_bytes = gguf_weight_bytes(engine["path"])

    def generate(self, prompts, new_tokens: int) -> dict:
        self.llm.reset()
        return _timed(self.llm.generate(prompts[0], top_k=1, temp=0.0, reset=True), new_tokens)


RUNNERS = {"ventoux": VentouxRunner, "transformers": TransformersRunner, "llama.cpp": LlamaCppRunner}


def main() -> None:
    spec = json.loads(sys.stdin.read())
    engine, settings, prompts = spec["engine"], spec["settings"], spec["prompts"]
    import torch

    if settings["threads"]:
        torch.set_num_threads(settings["threads"])
    settings["threads"] = torch.get_num_threads()
    t0 = time.perf_counter()
    runner = RUNNERS[engine["name"]](engine, settings)
    load_s = time.perf_counter() - t0
    # Warm-up (first-call allocations, kernel selection), on at most 512 prompt tokens: a long prompt's
    # prefill would take as long as a timed run. A compiled decode step warms up on the timed shapes.
    if engine.get("compile"):
        runner.generate(prompts, settings["new_tokens"])
    else:
        runner.generate([p[:512] for p in prompts], 4)
    runs = [_timed_run(runner, prompts, settings["new_tokens"]) for _ in range(settings["repeats"])]
    print(RESULT_MARK + json.dumps({"load_s": load_s, "weight_bytes": runner.weight_bytes,
                                    "peak_rss_bytes": peak_rss(), "runs": runs,
                                    "system_info": getattr(runner, "system_info", "")}), flush=True)


def peak_rss() -> int:
    """This process's peak resident memory in bytes. Linux: VmHWM, since ru_maxrss carries over the
    parent's peak through fork+exec; elsewhere ru_maxrss (bytes on macOS)."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


if __name__ == "__main__":
    main()
