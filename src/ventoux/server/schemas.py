"""Request bodies of the OpenAI endpoints (pydantic, strict: wrong types are 400s naming the field).

    req = parse(ChatRequest, await request.body())
    params = sampling_params(req, max_tokens_cap=4096, logprobs=req.top_logprobs or 0)

The sampling fields come from SamplingParams' table (params.py), with the HTTP defaults written there;
each may be null, which means that default. Unknown fields are refused: a typo is not silently ignored,
and no field names a file or a model path (`model` only picks a served name).
"""

from __future__ import annotations

import re
from dataclasses import MISSING
from typing import Literal, get_type_hints

from pydantic import BaseModel, ConfigDict, ValidationError, create_model
from starlette.requests import ClientDisconnect

from ..errors import VentouxError
from ..params import SamplingParams
from .errors import APIError

HTTP_FIELDS = SamplingParams.surface_fields("http")
HTTP_DEFAULTS = {f.name: default for f, default in HTTP_FIELDS}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


def _sampling_model() -> type[BaseModel]:
    hints = get_type_hints(SamplingParams)
    fields = {}
    for f, _ in HTTP_FIELDS:
        kind = str | list[str] if f.name == "stop" else hints[f.name]  # OpenAI: one stop string or a list
        fields[f.name] = (kind | None, None)  # null or absent: the HTTP default (applied in sampling_params)
    return create_model("SamplingFields", __base__=Strict, **fields)


class StreamOptions(Strict):
    include_usage: bool = False


class Common(_sampling_model()):
    model: str | None = None  # a served model name, nothing else
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted, unused


class TextPart(Strict):
    type: Literal["text"]
    text: str


class Message(Strict):
    role: str
    content: str | list[TextPart]
    name: str | None = None

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(Common):
    messages: list[Message]
    max_completion_tokens: int | None = None  # OpenAI's newer name for max_tokens
    logprobs: bool = False
    top_logprobs: int | None = None
    safe_prompt: bool = False


class CompletionRequest(Common):
    prompt: str | list[int]
    logprobs: int | None = None


class TokenizeRequest(Strict):
    model: str | None = None
    prompt: str | None = None
    messages: list[Message] | None = None
    add_special_tokens: bool = True


class DetokenizeRequest(Strict):
    model: str | None = None
    tokens: list[int]


def parse(model: type[BaseModel], body: bytes):
    """A request body -> the model, or a 400 naming the first wrong field."""
    try:
        return model.model_validate_json(body or b"{}")
    except ValidationError as e:
        errors = e.errors()
        err = errors[0]
        if err["type"] == "json_invalid":
            raise APIError(400, f"the request body is not valid JSON ({err['msg']})", code="invalid_json") from None
        if err["loc"] and _is_tag(err["loc"][-1]):  # a union (text or list): the branch that got furthest says most
            union = err["loc"][:-1]
            err = max((x for x in errors if x["loc"][:len(union)] == union), key=lambda x: len(x["loc"]))
        param = _param_name(err["loc"])
        if err["type"] == "literal_error" and "list[TextPart]" in err["loc"] and err["loc"][-1] == "type":
            part = _param_name(err["loc"][:-1])
            raise APIError(400, f"{part}: content parts of type {err['input']!r} are not supported; only text "
                           'parts ({"type": "text", "text": "..."}) are', param=part) from None
        if err["type"] == "model_type":
            what = param or "the request body"
            raise APIError(400, f"{what} must be a JSON object, not {_json_type(err['input'])}",
                           param=param or None) from None
        if err["loc"][:1] == ("logit_bias",) and len(err["loc"]) > 1:  # a key or value: a map's entries are no fields
            raise APIError(400, f"invalid logit_bias entry {err['loc'][1]!r}: {err['msg']} (it maps token ids to "
                           "biases in [-100, 100])", param="logit_bias") from None
        if err["type"] == "extra_forbidden":
            raise APIError(400, f"unknown parameter {param!r}", param=param) from None
        if err["type"] == "missing":
            raise APIError(400, f"missing required parameter {param!r}", param=param) from None
        raise APIError(400, f"invalid {param}: {err['msg']}", param=param) from None


def _is_tag(x) -> bool:
    """A union member's tag in an error's location, "str" or "list[TextPart]" (the request's unions are of a string
    and a list), or a map's "[key]"; not a field name."""
    return isinstance(x, str) and (x == "str" or not x.isidentifier())


def _param_name(loc: tuple) -> str:
    """("messages", 0, "role") -> "messages[0].role"; union tags such as "str" or "list[int]" dropped."""
    out = ""
    for x in loc:
        if isinstance(x, int):
            out += f"[{x}]"
        elif not _is_tag(x):
            out += f".{x}" if out else x
    return out


def _json_type(value) -> str:
    """How JSON calls a value's type, for "must be an object, not a string"."""
    kinds = {type(None): "null", bool: "a boolean", str: "a string", int: "a number", float: "a number",
             list: "an array", dict: "an object"}
    return kinds.get(type(value), type(value).__name__)


def sampling_params(req: Common, max_tokens_cap: int, logprobs: int | None = None) -> SamplingParams:
    """The request's SamplingParams: nulls are the HTTP defaults; max_tokens at most the server's cap."""
    values = {}
    for name, default in HTTP_DEFAULTS.items():
        value = getattr(req, name)
        values[name] = default if value is None else value
    param = "max_tokens"
    if isinstance(req, ChatRequest) and req.max_completion_tokens is not None:
        values["max_tokens"], param = req.max_completion_tokens, "max_completion_tokens"
    if values["max_tokens"] is None:
        values["max_tokens"] = max_tokens_cap
    if isinstance(values["max_tokens"], int) and values["max_tokens"] > max_tokens_cap:
        raise APIError(400, f"{param}={values['max_tokens']} is over this server's cap of {max_tokens_cap} "
                       "(--max-tokens-cap)", param=param)
    sent = {"max_tokens": param}  # SamplingParams' name -> the field the client sent
    if isinstance(req, ChatRequest):
        sent["logprobs"] = "top_logprobs"  # chat's logprobs is a flag; the count is top_logprobs
    try:
        params = SamplingParams(**values, logprobs=logprobs)
    except VentouxError as e:
        named = re.match(r"invalid sampling parameter (\w+)=", str(e))
        if named is None:
            raise APIError(400, str(e)) from None
        name = sent.get(named.group(1), named.group(1))
        message = f"invalid sampling parameter {name}={str(e)[named.end():]}"
        raise APIError(400, message, param=name) from None
    return params


assert all(f.default is not MISSING for f, _ in HTTP_FIELDS)  # every request field may be left out


async def accept(request, schema: type[BaseModel]):
    """The app's state and the request's parsed body, once the model is ready and the body names the served
    model: what every model route does first."""
    state = request.app.state.ventoux
    state.ready()
    try:
        body = await request.body()
    except ClientDisconnect:  # gone mid-body: an answer no one reads, rather than a traceback in the log
        raise APIError(400, "the client closed the connection before the end of its request body") from None
    req = parse(schema, body)
    state.check_model(req.model)
    return state, req


def chat_ids(tokenizer, messages, safe_prompt: bool = False) -> list[int]:
    """A request's messages in the model's chat format; a conversation the format refuses is a 400."""
    try:
        return tokenizer.encode_chat([{"role": m.role, "content": m.text} for m in messages], safe_prompt=safe_prompt)
    except VentouxError as e:
        raise APIError(400, str(e), param="messages") from None
