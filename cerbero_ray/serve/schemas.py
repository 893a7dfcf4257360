"""Request bodies of the HTTP API (OpenAI-compatible where OpenAI has the endpoint) and the error
format. Unknown fields and wrong types are refused (``extra="forbid"``, strict types): a client bug
is a 400 with the offending field named, never a silently ignored parameter.
"""

from __future__ import annotations

import json
from typing import Annotated, Literal, Optional, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

from cerbero_ray.logs import ECHO_CHARS, short  # noqa: F401 (re-exported: the app quotes values with it)


def _unicode(s: str) -> str:
    """Valid JSON may still hold a lone surrogate (``"\\ud800"``), which no tokenizer can encode."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("not valid Unicode (a lone surrogate)") from None
    return s


Text = Annotated[str, AfterValidator(_unicode)]
MAX_STOP = 4  # stop strings per request, as OpenAI
MAX_LOGIT_BIAS = 1024  # tokens a request may bias (OpenAI takes 300)
MAX_STOP_CHARS = 256  # a longer one would hold back that much of a stream (text that may start it is held)
Stop = Annotated[str, StringConstraints(min_length=1, max_length=MAX_STOP_CHARS), AfterValidator(_unicode)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class ContentPart(BaseModel):
    """One part of a message's content (OpenAI's list form). Only ``text`` parts are served; the
    others (``image_url``, ``input_audio``, ``file``…) are named in a 400 by the app."""

    model_config = ConfigDict(extra="allow", strict=True)
    type: str
    text: Optional[Text] = None


class Message(Strict):
    role: Literal["system", "user", "assistant"]
    content: Union[Text, list[ContentPart]]
    name: Optional[Text] = None  # accepted as clients send it; the cerbero format has no names, so unused


class ResponseFormat(Strict):
    type: str  # text (the default), json_object, json_schema (OpenAI's shapes; the app checks)
    json_schema: Optional[dict] = None  # {"name", "schema", "strict", "description"}


class StreamOptions(Strict):
    include_usage: bool = False  # a last chunk with no choices and the usage, as OpenAI sends it


class Sampled(Strict):
    model: Optional[str] = None
    max_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: float = Field(default=0.7, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float = Field(default=0.9, gt=0.0, le=1.0, allow_inf_nan=False)
    stop: Optional[Union[Stop, list[Stop]]] = Field(default=None)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    seed: Optional[int] = None
    user: Optional[Text] = None
    n: int = Field(default=1, ge=1)  # choices, each its own answer (at most serve.max_choices; checked in the app)
    # OpenAI's penalties on the tokens generated so far (both engines; null: 0)
    frequency_penalty: Optional[float] = Field(default=None, ge=-2.0, le=2.0, allow_inf_nan=False)
    presence_penalty: Optional[float] = Field(default=None, ge=-2.0, le=2.0, allow_inf_nan=False)
    repetition_penalty: Optional[float] = Field(default=None, gt=0.0, le=10.0, allow_inf_nan=False)  # vLLM's, HF's
    # OpenAI's: token id (a string) -> a number in [-100, 100] added to that token's logit (both engines)
    logit_bias: Optional[dict[str, Annotated[float, Field(ge=-100.0, le=100.0, allow_inf_nan=False)]]] = Field(
        default=None, max_length=MAX_LOGIT_BIAS
    )
    # constrained decoding as vLLM names it (engine=continuous): one of these, or response_format
    guided_choice: Optional[list[Text]] = Field(default=None, max_length=256)
    guided_regex: Optional[Text] = Field(default=None, max_length=4096)
    guided_json: Optional[Union[dict, Text]] = None
    # vLLM's: cached prompt prefixes are shared only among requests with the same salt (a tenant's
    # secret), so no one learns from their time to first token what prompts others sent
    cache_salt: Optional[Annotated[Text, StringConstraints(min_length=1, max_length=256)]] = None


class ChatRequest(Sampled):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)  # OpenAI's newer name for max_tokens
    logprobs: bool = False  # each answer token's log-probability (engine=continuous)
    top_logprobs: Optional[int] = Field(default=None, ge=0, le=20)  # and this many most likely tokens
    response_format: Optional[ResponseFormat] = None


class CompletionRequest(Sampled):
    prompt: Text


class TokenizeRequest(Strict):
    """vLLM's ``/tokenize`` body: a prompt, or a chat's messages rendered as the chat endpoint does."""

    model: Optional[Text] = None
    prompt: Optional[Text] = None
    messages: Optional[list[Message]] = Field(default=None, min_length=1)


class DetokenizeRequest(Strict):
    model: Optional[Text] = None
    tokens: list[int] = Field(max_length=1_000_000)


MAX_LABELS = 32  # of an inline task: each label is one more continuation scored per text
MAX_SHOTS = 32


class Example(Strict):
    text: Text
    label: Text


class InlineTask(Strict):
    """A labeling task sent with the request (the keys of ``conf/label/task/*.yaml``): how an
    evaluation, or any client, scores its own yes/no or multi-class question on this server."""

    name: Text = "inline"
    instruction: Text
    labels: dict[Text, Text] = Field(min_length=2, max_length=MAX_LABELS)  # label -> verbalizer
    few_shot: list[Example] = Field(default_factory=list, max_length=MAX_SHOTS)
    template: Optional[Text] = None


class LabelRequest(Strict):
    task: Union[Text, InlineTask]  # a task this server was started with (serve.label_tasks), or one inline
    texts: list[Text] = Field(min_length=1)
    model: Optional[Text] = None  # the base (serve.model_name) or one of serve.adapters


def duplicate_key(raw: bytes) -> str | None:
    """The first key an object of the JSON body ``raw`` repeats, or None: a JSON parser keeps the last
    value silently (``{"no": "No", "no": "Forse"}`` would be one label)."""
    found: list[str] = []

    def pairs(items):
        seen = set()
        for k, _ in items:
            if k in seen and not found:
                found.append(k)
            seen.add(k)
        return dict(items)

    try:
        json.loads(raw, object_pairs_hook=pairs)
    except (ValueError, RecursionError):
        return None
    return found[0] if found else None


def error_body(
    message: str, kind: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
