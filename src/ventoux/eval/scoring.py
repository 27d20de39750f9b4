"""Batched log-likelihood of token continuations: the one scoring loop behind perplexity, tasks and lm-eval.

    results = score(model, [(tokens, n), ...], batch_size=8)   # -> [(sum of log-probs, is_greedy), ...]

A request is a token sequence and how many of its last tokens to score: the model reads tokens[:-1] and
the last n predictions are compared with tokens[-n:]. Requests run longest first (batches of similar
lengths, little padding); each batch is padded on the right, which causal attention never looks at, so
every row starts at position 0 exactly as if it ran alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm import tqdm

Request = tuple[Sequence[int], int]  # (tokens, how many of the last tokens to score)


def score(model, requests: list[Request], batch_size: int = 8, progress: bool = False,
          desc: str = "scoring") -> list[tuple[float, bool]]:
    """(summed log-probability in nats of the scored tokens, whether each was the argmax) per request."""
    with torch.inference_mode():  # a context, not a decorator: mutation testing sees the body
        device = model.device
        seqs = [torch.as_tensor(tokens, dtype=torch.long) for tokens, _ in requests]
        for (_, n), seq in zip(requests, seqs):
            if not 1 <= n < len(seq):
                raise ValueError(f"cannot score {n} of {len(seq)} tokens: the first token has nothing to predict it")
        order = sorted(range(len(requests)), key=lambda i: -len(seqs[i]))
        out: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        batches = [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
        for batch in tqdm(batches, desc=desc, disable=not progress, unit="batch"):
            width = len(seqs[batch[0]]) - 1  # the longest input of the batch
            inputs = torch.zeros(len(batch), width, dtype=torch.long)
            for row, i in enumerate(batch):
                inputs[row, : len(seqs[i]) - 1] = seqs[i][:-1]
            logits = model(inputs.to(device))  # (B, T, vocab), float32
            for row, i in enumerate(batch):
                n, end = requests[i][1], len(seqs[i]) - 1
                target = seqs[i][-n:].to(device)
                logprobs = logits[row, end - n: end].log_softmax(-1)  # predictions of the last n tokens
                picked = logprobs.gather(-1, target[:, None])[:, 0]
                greedy = bool((logprobs.argmax(-1) == target).all())
                out[i] = (picked.double().sum().item(), greedy)
        return out
