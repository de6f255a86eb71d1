"""The request bodies of OpenAI's completions and chat completions APIs, as far as this server takes them.

Unknown fields are ignored (clients send many), except those this server cannot honour (`REFUSED`: a 400
that names the field, never a silent 200); a field we take with a wrong type or value is a 400 that names it.
Types are strict, as OpenAI's: `max_tokens: "5"` or `stream: "yes"` is refused, not converted; text holding a
lone surrogate (valid JSON, but no Unicode text) is refused where it is. Fields beyond OpenAI's (top_k, min_p,
penalty_decay, stop_token_ids, ignore_eos) use vLLM's names.
"""
from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, Strict, field_validator, model_validator

from ..sampling import SamplingParams
from .grammar import Grammar


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
    model_config = ConfigDict(extra="allow")  # kept to be looked at for REFUSED fields, otherwise ignored

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
    n: Int = Field(1, ge=1)
    stream: Bool = False
    ignore_eos: Bool = False  # vLLM's: go on past the end-of-text token (fixed-length outputs, for benchmarks)
    stream_options: dict | None = None
    logit_bias: dict[int, float] | None = None  # token id (a string in JSON) -> bias in [-100, 100]
    stop_token_ids: list[int] | None = None  # vLLM's: drawing one of these ends the text (it is not returned)
    response_format: dict | None = None  # {"type": "text" | "json_object" | "json_schema", "json_schema": {...}}

    REFUSED: ClassVar[dict] = {}  # field -> why it is refused

    def refused(self) -> tuple[str, str] | None:
        """(field, why) for the first field sent that this server cannot honour."""
        for field, why in self.REFUSED.items():
            if (self.model_extra or {}).get(field) not in (None, False, [], {}):
                return field, f"not supported by this server ({why})"
        return None

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, bias):
        if bias and not all(-100 <= b <= 100 and t >= 0 for t, b in bias.items()):
            raise ValueError("logit_bias maps token ids to biases in [-100, 100]")
        return bias

    @field_validator("response_format")
    @classmethod
    def _format(cls, fmt):
        if fmt is None or fmt.get("type") == "text":
            return None
        if fmt.get("type") == "json_object":
            return fmt
        if fmt.get("type") == "json_schema":
            spec = fmt.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
                raise ValueError('json_schema must be {"name": ..., "schema": {a JSON schema}, "strict": true}')
            return fmt
        raise ValueError(f"type must be 'text', 'json_object' or 'json_schema', got {fmt.get('type')!r}")

    def grammar(self) -> Grammar | None:
        """The grammar `response_format` asks for (None: free text)."""
        if self.response_format is None:
            return None
        if self.response_format["type"] == "json_object":
            return Grammar.json_object()
        return Grammar.json_schema(self.response_format["json_schema"].get("schema") or {"type": "object"})

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
                              penalty_decay=self.penalty_decay, stop=tuple(self.stop or ()), seed=self.seed,
                              logit_bias=self.logit_bias or ())

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(_Sampling):
    """prompt: a string, a list of token ids, or a list of strings or of token-id lists (several prompts;
    choice i*n + j is prompt i's j-th). echo: the prompt comes first in the text (and its logprobs, with `logprobs`); max_tokens 0 with echo
    reads the prompt only. logprobs: k alternatives per token (0: the chosen token's logprob only). best_of: that
    many rows per prompt (seeds as n's), the n with the highest logprob per token returned, best first."""

    REFUSED: ClassVar[dict] = {"suffix": "no fill-in-the-middle: send the text before the gap as the prompt"}

    prompt: Text | list[Text] | list[Int] | list[list[Int]]
    max_tokens: Int | None = Field(None, ge=0)
    echo: Bool = False
    logprobs: Int | None = Field(None, ge=0, le=20)
    best_of: Int | None = Field(None, ge=1)

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, prompt):
        prompts = [prompt] if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)) else prompt
        if not prompts or not all(prompts):
            raise ValueError("prompt is empty")
        return prompts

    def refused(self) -> tuple[str, str] | None:
        if self.max_tokens == 0 and not self.echo:
            return "max_tokens", "must be >= 1; 0 only with echo, to read a prompt's logprobs"
        if self.best_of is not None and self.best_of < self.n:
            return "best_of", f"must be >= n ({self.n}): the n choices are the best of best_of"
        if self.stream and self.rows > self.n:
            return "best_of", "cannot be streamed when greater than n (the best are known only at the end)"
        return super().refused()

    @property
    def rows(self) -> int:
        """Rows generated per prompt: best_of, of which the n with the highest logprob per token are returned."""
        return self.best_of or self.n

    def sampling(self, default_max_tokens: int) -> SamplingParams:
        if self.max_tokens == 0:  # echo of the prompt only: the request draws nothing (read_only)
            return self.model_copy(update={"max_tokens": 1}).sampling(default_max_tokens)
        return super().sampling(default_max_tokens)


class TextPart(BaseModel):
    type: Text
    text: Text

    @field_validator("type")
    @classmethod
    def _text_only(cls, kind):
        if kind != "text":
            raise ValueError(f"content part of type {kind!r} is not supported: this server takes text only")
        return kind


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = None  # None: an assistant turn that only called tools
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    name: str | None = None

    @model_validator(mode="after")
    def _some_content(self):
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs content")
        return self

    def as_dict(self) -> dict:
        content = self.content
        text = content if isinstance(content, str) else "".join(part.text for part in content or ())
        out = {"role": "system" if self.role == "developer" else self.role, "content": text}
        if self.tool_calls:
            out["tool_calls"] = self.tool_calls
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


class Tool(BaseModel):
    type: Literal["function"]
    function: dict[str, Any]

    @field_validator("function")
    @classmethod
    def _function(cls, function):
        if not isinstance(function.get("name"), str) or not isinstance(function.get("parameters", {}), dict):
            raise ValueError("a function needs a name and, optionally, parameters as a JSON schema object")
        return function


class ChatRequest(_Sampling):
    """logprobs / top_logprobs: the chosen token's logprob and k alternatives, per token. tools, tool_choice
    ('auto', 'none', 'required' or {"type": "function", "function": {"name": ...}}), parallel_tool_calls:
    see rwkv_lm/serve/tools.py for how calls are written for the model."""

    REFUSED: ClassVar[dict] = {"audio": "text only", "prediction": "no predicted outputs",
               "functions": "the legacy functions field: send tools", "function_call": "send tool_choice"}

    messages: list[Message] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool = True
    modalities: list[Literal["text"]] | None = None

    @model_validator(mode="after")
    def _tool_choice(self):
        choice, names = self.tool_choice, [t.function["name"] for t in self.tools or ()]
        if isinstance(choice, dict):
            name = (choice.get("function") or {}).get("name")
            if choice.get("type") != "function" or name not in names:
                raise ValueError(f"tool_choice names a function that is not among tools ({', '.join(names) or 'none given'})")
        elif choice not in (None, "auto", "none", "required"):
            raise ValueError("tool_choice must be 'auto', 'none', 'required' or {\"type\": \"function\", ...}")
        elif choice == "required" and not names:
            raise ValueError("tool_choice 'required' needs tools")
        return self

    def functions(self) -> list[dict]:
        """The functions offered to the model (none when tool_choice is 'none')."""
        return [] if self.tool_choice == "none" else [t.function for t in self.tools or ()]

    def forced_functions(self) -> list[dict] | None:
        """The functions the reply must call (tool_choice 'required' or named), or None."""
        if isinstance(self.tool_choice, dict):
            return [f for f in self.functions() if f["name"] == self.tool_choice["function"]["name"]]
        return self.functions() if self.tool_choice == "required" else None
