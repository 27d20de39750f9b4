"""ventoux as an lm-evaluation-harness model, `ventoux`: log-likelihoods and greedy generation on ventoux.

    ventoux-lm-eval --model ventoux --model_args pretrained=./Mistral-7B-v0.1,dtype=bfloat16,quantize=int8 \
        --tasks hellaswag,arc_easy --batch_size 8
    lm_eval --model ventoux ...          # the same, with an lm-eval that discovers `lm_eval.models` entry points

    import lm_eval, ventoux.eval.lm_eval_backend  # registers "ventoux"
    lm_eval.simple_evaluate(model="ventoux", model_args="pretrained=SRC,lora=ADAPTER", tasks=[...])

model_args: pretrained (a folder, repo id or preset; default the demo model), dtype, device, quantize,
lora (an adapter folder), max_length (default the model's context), max_gen_toks (default 256).
Requests are tokenized as lm-eval's `hf` model does (BOS first, the context/continuation split of
TemplateLM) so the two give the same numbers on the same weights (tests/test_lm_eval.py).
loglikelihood_rolling scores [BOS] + text in consecutive windows of max_length tokens (ventoux.eval.
perplexity), every text token once. generate_until goes through ventoux's own generation, greedy unless
the task asks for sampling, stopping at the task's `until` strings or at end of sequence.
--apply_chat_template renders prompts with mistral-common (the model's own chat format) and scores them on
its exact token ids (apply_chat_template below).

lm-eval 0.4.13, the latest release, finds models only in its own registry; the `lm_eval.models` entry
point (pyproject.toml) is what its merged plugin discovery (EleutherAI/lm-evaluation-harness#4013)
reads. Until a release carries it, `ventoux-lm-eval` (main below) registers the model and runs lm-eval's
own command line with the arguments unchanged.
"""

from __future__ import annotations

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from tqdm import tqdm

from ..errors import VentouxError
from .perplexity import strided_loss
from .scoring import score


def _batch_size(value) -> int:
    """lm-eval passes --batch_size as given: 8, "8", "auto" or "auto:N" (no probing here: 8 then)."""
    if isinstance(value, int):
        return value
    text = str(value)
    return int(text) if text.isdigit() else 8


@register_model("ventoux")
class VentouxLM(TemplateLM):
    def __init__(self, pretrained=None, dtype=None, device=None, quantize=None, lora=None, batch_size=8,
                 max_length=None, max_gen_toks=256, max_batch_size=None):
        super().__init__()  # a misspelt model_arg is a TypeError naming it; max_batch_size: lm-eval's, unused
        import ventoux

        extra = {"lora": str(lora)} if lora else {}
        dtype = None if dtype == "auto" else dtype  # "auto" as for the hf model: the device's best
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            device = None  # lm-eval's command line defaults to cuda:0; like its hf model, fall back here
        self.llm = ventoux.load(None if pretrained is None else str(pretrained), dtype=dtype, device=device,
                                quantize=quantize, **extra)
        self.vtok = self.llm.tokenizer  # not self.tokenizer: lm-eval reads that one as a HF tokenizer
        self._batch = _batch_size(batch_size)
        self._max_length = int(max_length or self.llm.config.max_seq_len)
        self._max_gen_toks = int(max_gen_toks)
        self._rendered: dict[str, list[int]] = {}  # chat prompts rendered as text -> mistral-common's ids
        self._rendered_starts: set[str] = set()  # their first characters: a cheap test for other texts

    # ---- what TemplateLM asks for --------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.vtok.eos_id

    @property
    def prefix_token_id(self) -> int:  # an empty context is BOS, as the hf model with a BOS tokenizer
        return self.vtok.bos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return f"ventoux-{self.vtok.version}"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """Text to ids; a text that starts with a chat prompt this model rendered keeps that prompt's ids."""
        if string[:8] in self._rendered_starts:
            for end in range(len(string), 0, -1):  # longest rendered prefix: the continuation is short
                ids = self._rendered.get(string[:end])
                if ids is not None:
                    rest = string[end:]
                    return ids + (self.vtok.encode(rest, bos=False) if rest else [])
        return self.vtok.encode(string, bos=add_special_tokens is not False)

    # ---- chat templates (--apply_chat_template) ----------------------------------------------
    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """lm-eval wants the prompt as text; re-tokenizing "[INST]" as text would give other ids (transformers
        warns of this for its mistral-common tokenizer), so the text is remembered with mistral-common's exact
        ids and tok_encode returns those. Without add_generation_prompt the last (assistant) message is
        continued: lm-eval's gen_prefix."""
        ids, text = self.vtok.render_chat(chat_history, continue_final=not add_generation_prompt)
        self._rendered[text] = ids
        self._rendered_starts.add(text[:8])
        return text

    def chat_template(self, chat_template: bool | str = False) -> str:
        """What lm-eval records as the template (for its cache keys and results): mistral-common's, by version."""
        return f"mistral-common instruct {self.vtok.version}"

    def tok_decode(self, tokens) -> str:
        return self.vtok.decode(tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """((context, continuation), context ids, continuation ids) -> (log-prob, greedy); like the hf model,
        keeps the last max_length + 1 tokens of context + continuation."""
        scored = []
        for _, ctx, cont in requests:
            tokens = (ctx + cont)[-(self.max_length + 1):]
            scored.append((tokens, min(len(cont), len(tokens) - 1)))
        results = score(self.llm.model, scored, self._batch, progress=not disable_tqdm, desc="loglikelihood")
        for (key, _, _), result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for req in tqdm(requests, desc="loglikelihood_rolling", disable=disable_tqdm):
            (text,) = req.args
            nll, _ = strided_loss(self.llm.model, self.tok_encode(text), self.max_length, batch_size=self._batch)
            out.append(-nll)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), -nll)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        groups: dict[str, list[int]] = {}  # requests with the same generation settings run in batches together
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items())), []).append(i)
        out = [""] * len(requests)
        bar = tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm)
        for indices in groups.values():
            kwargs = normalize_gen_kwargs(requests[indices[0]].args[1], self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=None)  # EOS stops as a token
            max_gen = kwargs.pop("max_gen_toks")
            if max_gen >= self.max_length:
                raise VentouxError(f"max_gen_toks {max_gen} leaves no room for a prompt in max_length "
                                   f"{self.max_length}: lower it, or raise max_length in --model_args")
            # normalize_gen_kwargs sets temperature 0.0 unless do_sample; do_sample without one is greedy there too
            sampling = {"temperature": float(kwargs.get("temperature", 0.0))}
            # as the hf model: the context keeps its last max_length - max_gen_toks tokens
            prompts = [self.tok_encode(requests[i].args[0])[-(self.max_length - max_gen):] for i in indices]
            order = sorted(range(len(indices)), key=lambda k: -len(prompts[k]))  # similar lengths batch together
            for start in range(0, len(order), self._batch):
                chunk = order[start: start + self._batch]
                done = self.llm.generate([prompts[k] for k in chunk], max_tokens=max_gen,
                                         stop=[s for s in until if s] or None, **sampling)
                for k, completion in zip(chunk, done):
                    i = indices[k]
                    out[i] = postprocess_generated_text(completion.text, until, None)
                    self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
                bar.update(len(chunk))
        bar.close()
        return out


def main() -> None:
    """`ventoux-lm-eval ARGS`: lm-eval's command line with the `ventoux` model registered (see above)."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
