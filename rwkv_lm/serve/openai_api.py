"""The request bodies of OpenAI's completions and chat completions APIs, as far as this server takes them.

Unknown fields are ignored (clients send many); a field we take with a wrong type or value is a 400 that
names it. Sampling fields beyond OpenAI's (top_k, min_p, penalty_decay) use vLLM's names.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..sampling import SamplingParams


class ApiError(Exception):
    """An error answered in OpenAI's JSON: {"error": {"message", "type", "param", "code"}}."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             413: "invalid_request_error", 503: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    # the values' ranges are checked once, by SamplingParams (a SamplingError names the field: a 400)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None  # the chat API's newer name for max_tokens
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    penalty_decay: float = 1.0
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = 1
    stream: bool = False
    ignore_eos: bool = False  # vLLM's: go on past the end-of-text token (fixed-length outputs, for benchmarks)
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
    prompt: str | list[str]

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
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def as_dict(self) -> dict:
        text = self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
