"""Fine-tuning data as mistral-finetune defines it: JSON lines -> token ids and a loss mask per sample.

    data = SFTData.load(["train.jsonl"], MistralTokenizer.from_file(path), seq_len=512)
    print(data.report(batch_size=8, accumulate=1))    # every bad line (file:line: why), then a summary
    x, y, n = data.batch(seed=0, step=3, micro=0, batch_size=8, accumulate=1)   # y is -100 off the loss

Lines are {"text": "..."} (continued pretraining: [BOS] text [EOS], every token in the loss) or
{"messages": [...], "tools": [...]} conversations: roles system (at most one), user, assistant, tool;
the last turn is the assistant's. A conversation is encoded exactly as mistral-common encodes it for
the model's tokenizer (its finetuning validation, its normalizer, its per-message encoders, so the
concatenation is its encode_chat_completion); the loss covers the assistant turns (their text and
</s>, or their [TOOL_CALLS]) except those with "weight": 0. Function calling (tools, assistant
tool_calls {id, function{name, arguments}}, tool messages with tool_call_id) needs a tokenizer that
has tool tokens (v3, tekken); the demo model's plain SentencePiece tokenizer is v1 (no tools).

Batches: samples are padded (on the right, with no loss) to the longest sample of their batch rather
than packed: causal attention never looks right, so padding needs no mask and no change to the model,
and the padding share stays small when samples have similar lengths (--validate-only reports it).
The order is a per-epoch permutation drawn from (seed, epoch): a pure function of the step, for resume.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import VentouxError

ROLES = ("system", "user", "assistant", "tool")


@dataclass
class Sample:
    where: str  # "file:line"
    tokens: list[int]
    trained: list[bool]  # per token: is it a loss target (as the label of the token before it)


class BadLine(Exception):
    """What is wrong with one line (caught per line, so every bad line is reported)."""


@dataclass
class SFTData:
    samples: list[Sample]
    problems: list[str] = field(default_factory=list)  # "file:line: what is wrong"

    @classmethod
    def load(cls, paths, tokenizer, seq_len: int) -> SFTData:
        """Read and encode every line of `paths` with the mistral-common tokenizer `tokenizer` (its
        finetuning mode); each bad line becomes a problem instead of stopping at the first."""
        samples, problems = [], []
        for path in map(Path, paths):
            if not path.is_file():
                raise VentouxError(f"the data file {path} does not exist; check the path")
            try:
                lines = path.read_text(encoding="utf-8").splitlines()
            except UnicodeDecodeError as e:
                raise VentouxError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); convert it") from None
            for n, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                where = f"{path}:{n}"
                try:
                    tokens, trained = encode_line(line, tokenizer)
                    if len(tokens) > seq_len:
                        raise BadLine(f"the sample is {len(tokens)} tokens, longer than --seq-len {seq_len}")
                except BadLine as e:
                    problems.append(f"{where}: {e}")
                    continue
                samples.append(Sample(where, tokens, trained))
        return cls(samples, problems)

    def fingerprint(self) -> str:
        """A digest of what trains (tokens and loss masks): a resumed run checks its data did not change."""
        h = hashlib.sha256()
        for s in self.samples:
            h.update(json.dumps([s.tokens, s.trained]).encode())
        return h.hexdigest()

    def steps_per_epoch(self, batch_size: int, accumulate: int) -> int:
        return math.ceil(len(self.samples) / (batch_size * accumulate))

    def report(self, batch_size: int, accumulate: int, seed: int | None = 0) -> str:
        """Every problem on its own line, then the summary (with the padding share of one epoch's batches;
        seed None: batches in file order, as the evaluation takes them)."""
        tokens = sum(len(s.tokens) for s in self.samples)
        trained = sum(sum(s.trained) for s in self.samples)
        summary = (f"{len(self.samples)} samples, {tokens} tokens ({trained} in the loss), "
                   f"{self.steps_per_epoch(batch_size, accumulate)} steps per epoch at --batch-size {batch_size}"
                   f" x --accumulate {accumulate}")
        if self.samples:
            summary += f", padding {100 * self.pad_share(seed, batch_size):.0f}% of the batch tokens"
        if self.problems:
            summary = f"{len(self.problems)} bad lines; valid: " + summary
        return "\n".join([*self.problems, summary])

    def pad_share(self, seed: int | None, batch_size: int) -> float:
        """The share of padding in the batches of the first epoch (what packing would save at most)."""
        padded = real = 0
        for first in range(0, len(self.samples), batch_size):
            if seed is None:  # evaluation's batches: the file in order, the last one short
                rows = self.samples[first: first + batch_size]
            else:  # training's: the seed's permutation, the last batch filled from the next epoch
                rows = [self.samples[self._index(seed, r)] for r in range(first, first + batch_size)]
            lengths = [len(s.tokens) - 1 for s in rows]
            padded += max(lengths) * len(lengths)
            real += sum(lengths)
        return 1 - real / padded

    def batch(self, seed: int, step: int, micro: int, batch_size: int, accumulate: int, pad_id: int = 0):
        """(inputs (B, T), targets (B, T) with -100 where no loss, real tokens): rows (step*A + micro)*B ...
        of the sample stream, which is epoch after epoch of permutations drawn from (seed, epoch)."""
        first = (step * accumulate + micro) * batch_size
        rows = [self.samples[self._index(seed, r)] for r in range(first, first + batch_size)]
        return collate(rows, pad_id)

    def _index(self, seed: int, row: int) -> int:
        n = len(self.samples)
        epoch, i = divmod(row, n)
        if getattr(self, "_epoch", None) != (seed, epoch):
            self._epoch, self._order = (seed, epoch), np.random.default_rng([seed, epoch]).permutation(n)
        return int(self._order[i])


def collate(samples: list[Sample], pad_id: int = 0):
    """Right-padded inputs and targets: targets are the next tokens where trained, else -100."""
    width = max(len(s.tokens) for s in samples) - 1
    x = torch.full((len(samples), width), pad_id, dtype=torch.long)
    y = torch.full((len(samples), width), -100, dtype=torch.long)
    for i, s in enumerate(samples):
        ids = torch.tensor(s.tokens)
        keep = torch.tensor(s.trained[1:])
        x[i, : len(ids) - 1] = ids[:-1]
        y[i, : len(ids) - 1] = torch.where(keep, ids[1:], -100)
    return x, y, sum(len(s.tokens) - 1 for s in samples)


def encode_line(line: str, tokenizer) -> tuple[list[int], list[bool]]:
    """One JSON line -> (tokens, trained); BadLine says what is wrong with it."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise BadLine(f"not valid JSON ({e.msg})") from None
    except RecursionError:
        raise BadLine("its JSON nests arrays or objects too deeply to read") from None
    if not isinstance(obj, dict) or ("text" in obj) == ("messages" in obj):
        raise BadLine('each line must be an object with either "text" (a string) or "messages" (a list)')
    _check_text(obj)
    raw = tokenizer.instruct_tokenizer.tokenizer
    if "text" in obj:
        if not isinstance(obj["text"], str) or not obj["text"]:
            raise BadLine('"text" must be a non-empty string')
        tokens = raw.encode(obj["text"], bos=True, eos=True)
        return tokens, [True] * len(tokens)
    return encode_conversation(obj["messages"], obj.get("tools", obj.get("available_tools")), tokenizer)


def _check_text(obj: dict) -> None:
    """Every string of the line, keys too, must be text: JSON's "\\ud800" escape gives a lone surrogate, which no
    tokenizer encodes. A stack, not recursion: a line may nest about as deep as json.loads reads."""
    stack = [("", obj)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, dict):  # keys pushed last, so checked first: a reported path holds checked keys only
            stack += [(f"{where}.{k}" if where else k, v) for k, v in value.items()]
            stack += [(f"a key of {where or 'the line'}", k) for k in value]
        elif isinstance(value, list):
            stack += [(f"{where}[{i}]", v) for i, v in enumerate(value)]
        elif isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:
                raise BadLine(f"{where} holds a lone surrogate (\\u{ord(value[e.start]):04x} at character {e.start}), "
                              "not text; fix that line") from None


def _check_messages(messages, tools) -> list[float]:
    """Structural checks with clear messages; returns each message's weight (None: not an assistant turn)."""
    if not isinstance(messages, list) or not messages:
        raise BadLine('"messages" must be a non-empty list of {"role": ..., "content": ...}')
    if tools is not None and not isinstance(tools, list):
        raise BadLine('"tools" must be a list of {"type": "function", "function": {...}}')
    weights, systems = [], 0
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise BadLine(f"messages[{i}] is not an object")
        role = m.get("role")
        if role not in ROLES:
            raise BadLine(f"messages[{i}] has the unknown role {role!r}; use one of {', '.join(ROLES)}")
        systems += role == "system"
        if role != "assistant" and not isinstance(m.get("content"), str):
            raise BadLine(f'messages[{i}] ({role}) needs a "content" string')
        if role == "tool" and not isinstance(m.get("tool_call_id"), str):
            raise BadLine(f'messages[{i}] (tool) needs a "tool_call_id" string naming the call it answers')
        if role == "assistant":
            if not isinstance(m.get("content"), str) and not m.get("tool_calls"):
                raise BadLine(f'messages[{i}] (assistant) needs a "content" string or "tool_calls"')
            calls = m.get("tool_calls") or []
            if not isinstance(calls, list) or not all(_is_call(c) for c in calls):
                raise BadLine(f'messages[{i}].tool_calls must be a list of {{"id": str, "function": '
                              '{"name": str, "arguments": str}}')
            weight = m.get("weight", 1)
            if weight not in (0, 1) or isinstance(weight, bool):
                raise BadLine(f'messages[{i}].weight must be 0 or 1, not {weight!r}')
            weights.append(float(weight))
        else:
            weights.append(None)
    if systems > 1:
        raise BadLine(f"{systems} system messages; at most one is allowed")
    if messages[-1]["role"] != "assistant":
        raise BadLine(f"the conversation ends with a {messages[-1]['role']} turn; it must end with the assistant's")
    return weights


def _is_call(call) -> bool:
    f = call.get("function") if isinstance(call, dict) else None
    return (isinstance(call.get("id") if isinstance(call, dict) else None, str) and isinstance(f, dict)
            and isinstance(f.get("name"), str) and isinstance(f.get("arguments"), (str, dict)))


def encode_conversation(messages, tools, tokenizer) -> tuple[list[int], list[bool]]:
    """mistral-common's encode_chat_completion, message by message, so each token knows its turn."""
    from mistral_common.exceptions import MistralCommonException
    from mistral_common.protocol.instruct.messages import (
        AssistantMessage,
        FinetuningAssistantMessage,
        SystemMessage,
        ToolMessage,
        UserMessage,
    )
    from mistral_common.protocol.instruct.normalize import get_normalizer
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.protocol.instruct.validator import ValidationMode, get_validator
    from pydantic import ValidationError

    weights = _check_messages(messages, tools)
    kinds = {"system": SystemMessage, "user": UserMessage, "assistant": FinetuningAssistantMessage,
             "tool": ToolMessage}
    fields = {"system": ("content",), "user": ("content",), "assistant": ("content", "tool_calls", "weight"),
              "tool": ("content", "tool_call_id", "name")}
    it = tokenizer.instruct_tokenizer
    version = it.tokenizer.version
    try:
        objs = [kinds[m["role"]].model_validate({k: m[k] for k in fields[m["role"]] if k in m})
                for m in messages]
        request = ChatCompletionRequest(messages=objs, tools=tools or None)
        request = get_validator(version, ValidationMode.finetuning).validate_request(request)
        instruct = get_normalizer(version).from_chat_completion_request(request)
        it.validate_messages(instruct.messages)
        first, last = it.find_first_last_user(instruct)
        # the normalizer merges consecutive assistant turns of equal weight: one weight per merged turn
        runs = [w for i, w in enumerate(weights) if w is not None and (i == 0 or weights[i - 1] != w)]
        if len(runs) != sum(isinstance(m, AssistantMessage) for m in instruct.messages):
            raise BadLine("mistral-common merged assistant turns of different weights; separate them by a user turn")
        tokens, trained = list(it.start()), [False]
        for i, msg in enumerate(instruct.messages):
            if isinstance(msg, UserMessage):
                ids = it.encode_user_message(msg, instruct.available_tools, i == last, i == first,
                                             system_prompt=instruct.system_prompt, force_img_first=True,
                                             settings=instruct.settings)[0]
            elif isinstance(msg, ToolMessage):
                ids = it.encode_tool_message(msg, i < last)[0]
            elif isinstance(msg, AssistantMessage):
                ids = it.encode_assistant_message(msg, i < last)
            elif isinstance(msg, SystemMessage):
                ids = it.encode_system_message(msg)[0]
            else:
                raise BadLine(f"mistral-common made an unexpected {type(msg).__name__}")
            learn = isinstance(msg, AssistantMessage) and runs.pop(0) == 1
            tokens += ids
            trained += [learn] * len(ids)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise BadLine(f"{where}: {err['msg']}" if where else err["msg"]) from None
    except (MistralCommonException, NotImplementedError, AssertionError, ValueError) as e:
        reason = " ".join(str(e).split()) or type(e).__name__
        if "not implemented" in reason.lower():
            reason += f" (the model's tokenizer is {version.value}; tool calls need v3 or tekken)"
        raise BadLine(reason) from None
    return tokens, trained


