"""Request bodies of the HTTP API (OpenAI-compatible where OpenAI has the endpoint) and the error
format. Unknown fields and wrong types are refused (``extra="forbid"``, strict types): a client bug
is a 400 with the offending field named, never a silently ignored parameter.
"""

from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field


def _unicode(s: str) -> str:
    """Valid JSON may still hold a lone surrogate (``"\\ud800"``), which no tokenizer can encode."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("not valid Unicode (a lone surrogate)") from None
    return s


Text = Annotated[str, AfterValidator(_unicode)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class Message(Strict):
    role: Literal["system", "user", "assistant"]
    content: Text


class StreamOptions(Strict):
    include_usage: bool = False  # a last chunk with no choices and the usage, as OpenAI sends it


class Sampled(Strict):
    model: Optional[str] = None
    max_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: float = Field(default=0.7, ge=0.0, le=2.0)
    top_p: float = Field(default=0.9, gt=0.0, le=1.0)
    stop: Optional[Union[Text, list[Text]]] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    seed: Optional[int] = None
    user: Optional[Text] = None
    n: int = Field(default=1, ge=1, le=1)
    # accepted as clients and frameworks send them, at their neutral value only (checked in the app)
    frequency_penalty: Optional[float] = None
    presence_penalty: Optional[float] = None


class ChatRequest(Sampled):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)  # OpenAI's newer name for max_tokens


class CompletionRequest(Sampled):
    prompt: Text


class LabelRequest(Strict):
    task: Text
    texts: list[Text] = Field(min_length=1)


def error_body(
    message: str, kind: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
