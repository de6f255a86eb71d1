"""The request bodies of OpenAI's completions and chat completions APIs, as far as this server takes them.

Unknown fields are ignored (clients send many); a field we take with a wrong type or value is a 400 that
names it. Types are strict, as OpenAI's: `max_tokens: "5"` or `stream: "yes"` is refused, not converted; text
holding a lone surrogate (valid JSON, but no Unicode text) is refused where it is. Sampling fields beyond
OpenAI's (top_k, min_p, penalty_decay) use vLLM's names.
"""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, Strict, field_validator, model_validator

from ..sampling import SamplingParams


class ApiError(Exception):
    """An error answered in OpenAI's JSON: {"error": {"message", "type", "param", "code"}}."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
             405: "invalid_request_error", 408: "invalid_request_error", 413: "invalid_request_error",
             503: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}


def _unicode(text: str) -> str:
    try:
        text.encode("utf-8")  # (a C loop: a long prompt costs milliseconds)
    except UnicodeEncodeError as e:
        raise ValueError(f"holds a lone surrogate (\\u{ord(text[e.start]):04x} at character {e.start}), which is not "
                         "Unicode text: send whole characters (a surrogate pair encodes one beyond U+FFFF)") from None
    return text


Text = Annotated[str, Strict(), AfterValidator(_unicode)]
Int = Annotated[int, Strict()]
Float = Annotated[float, Strict()]  # an int is a float too; a string is neither
Bool = Annotated[bool, Strict()]


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: Text | None = None
    # the values' ranges are checked once, by SamplingParams (a SamplingError names the field: a 400)
    max_tokens: Int | None = None
    max_completion_tokens: Int | None = None  # the chat API's newer name for max_tokens
    temperature: Float = 1.0
    top_p: Float = 1.0
    top_k: Int = 0
    min_p: Float = 0.0
    presence_penalty: Float = 0.0
    frequency_penalty: Float = 0.0
    penalty_decay: Float = 1.0
    stop: Text | list[Text] | None = None
    seed: Int | None = None
    n: Int = 1
    stream: Bool = False
    ignore_eos: Bool = False  # vLLM's: go on past the end-of-text token (fixed-length outputs, for benchmarks)
    stream_options: dict | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n):
        if n != 1:
            raise ValueError("only n=1 is supported: send one request per completion (they are batched anyway)")
        return n

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop):
        stops = [stop] if isinstance(stop, str) else (stop or [])
        if len(stops) > 4 or not all(stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops

    def sampling(self, default_max_tokens: int) -> SamplingParams:
        given = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        return SamplingParams(max_tokens=default_max_tokens if given is None else given,
                              temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
                              presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
                              penalty_decay=self.penalty_decay, stop=tuple(self.stop or ()), seed=self.seed)

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(_Sampling):
    prompt: Text | list[Text]

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt):
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if len(prompts) != 1:
            raise ValueError("send one prompt per request (a list of one string is accepted)")
        if not prompts[0]:
            raise ValueError("prompt is empty")
        return prompts[0]


class TextPart(BaseModel):
    type: Literal["text"]
    text: Text


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[TextPart] | None = None  # None: an assistant turn that only called tools

    @model_validator(mode="after")
    def _content(self):
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs content")
        return self

    def as_dict(self) -> dict:
        """{"role", "content"} for the chat template (an assistant's null content as "")."""
        if self.content is None:
            return {"role": "assistant", "content": ""}
        text = self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
