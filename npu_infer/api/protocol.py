"""Request and response schemas of the OpenAI-compatible API (pydantic), with vLLM's extra sampling fields."""
from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator

from npu_infer.api.errors import bad_request
from npu_infer.sampling import SamplingParams
from npu_infer.structured_output import StructuredOutputsParams


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class OpenAIModel(BaseModel):
    # Unknown fields are ignored, as OpenAI clients send fields a server may not know.
    model_config = ConfigDict(extra="ignore")


class RequestModel(OpenAIModel):
    """A request body: fields we do not know are kept, so the handler can refuse them by name (no silent 200)."""
    model_config = ConfigDict(extra="allow", populate_by_name=True)

    def refuse_unknown_fields(self) -> None:
        unknown = sorted(self.model_extra or {})
        if unknown:
            names = ", ".join(repr(k) for k in unknown)
            raise bad_request(f"this server does not implement the field{'s' if len(unknown) > 1 else ''} {names}; "
                              "leave it out", unknown[0])


class JsonSchemaFormat(OpenAIModel):
    name: str = "response"
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class ResponseFormat(OpenAIModel):
    type: Literal["text", "json_object", "json_schema", "structural_tag"]
    json_schema: JsonSchemaFormat | None = None
    # structural_tag (vLLM's): {"structures": [{"begin", "schema", "end"}], "triggers": [...]}, or xgrammar's "format"
    structures: list[dict[str, Any]] | None = None
    triggers: list[str] | None = None
    format: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _schema_given(self):
        if self.type == "json_schema" and (self.json_schema is None or self.json_schema.json_schema is None):
            raise ValueError("response_format of type json_schema needs json_schema.schema")
        return self


class StructuredOutputsRequest(BaseModel):
    """vLLM's `structured_outputs` request field."""
    model_config = ConfigDict(extra="forbid")
    json_: str | dict[str, Any] | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: str | dict[str, Any] | None = None
    disable_any_whitespace: bool = False


class StreamOptions(OpenAIModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False


# Fields of vLLM's protocol this server takes but only at their default: value -> why it is refused otherwise.
_ONLY_DEFAULT = {
    "use_beam_search": (False, "beam search is not implemented"),
    "length_penalty": (1.0, "length_penalty only applies to beam search, which is not implemented"),
    "spaces_between_special_tokens": (True, "only the tokenizer's own spacing is implemented"),
    "guided_whitespace_pattern": (None, "a custom whitespace pattern is not implemented (xgrammar has none)"),
    "logits_processors": (None, "custom logits processors are not loaded by this server"),
    "cache_salt": (None, "prefix-cache salting is not implemented"),
    "kv_transfer_params": (None, "disaggregated serving is not implemented"),
    "vllm_xargs": (None, "no extension reads vllm_xargs here"),
    "mm_processor_kwargs": (None, "this is a text-only model"),
    "prompt_embeds": (None, "prompt embeddings are not implemented; send text or token ids"),
}


class _SamplingFields(RequestModel):
    """Fields shared by completions and chat, in vLLM's names."""
    model: str | None = None
    n: int = Field(1, ge=1, le=128)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = None
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)  # torch generators take 64-bit seeds
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=2.0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    return_token_ids: bool = False  # vLLM's: also send the generated token ids (always, without a tokenizer)
    return_tokens_as_token_ids: bool | None = None  # logprobs' tokens as "token_id:N"
    logit_bias: dict[str, float] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    truncate_prompt_tokens: int | None = Field(None, ge=1)
    add_special_tokens: bool | None = None
    priority: int = 0
    request_id: str | None = None
    # structured outputs: response_format (OpenAI), structured_outputs (vLLM), guided_* (vLLM's older names)
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsRequest | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    structural_tag: str | None = None
    guided_decoding_backend: str | None = None
    # vLLM's fields taken only at their defaults (_ONLY_DEFAULT says why)
    use_beam_search: bool = False
    length_penalty: float = 1.0
    spaces_between_special_tokens: bool = True
    guided_whitespace_pattern: str | None = None
    logits_processors: list | None = None
    cache_salt: str | None = None
    kv_transfer_params: dict[str, Any] | None = None
    vllm_xargs: dict[str, Any] | None = None
    mm_processor_kwargs: dict[str, Any] | None = None

    @field_validator("logit_bias")
    @classmethod
    def _token_id_keys(cls, value):
        for key in value or {}:
            if not key.lstrip("-").isdigit():
                raise ValueError(f"logit_bias keys are token ids as strings; got {key!r}")
        return value

    def refuse_unsupported(self) -> None:
        """400 naming the first field this server would otherwise drop: unknown, or vLLM's but not implemented."""
        self.refuse_unknown_fields()
        for name, (default, why) in _ONLY_DEFAULT.items():
            if name in self.model_fields and getattr(self, name) != default:
                raise bad_request(f"{name} is not supported: {why}; leave it out", name)

    def structured_outputs_params(self, extra_json_schema: dict | None = None) -> StructuredOutputsParams | None:
        """The one output constraint this request asks for, from whichever field it used."""
        given: dict[str, dict] = {}
        if self.response_format is not None and self.response_format.type != "text":
            rf = self.response_format
            if rf.type == "json_object":
                given["response_format"] = {"json_object": True}
            elif rf.type == "json_schema":
                given["response_format"] = {"json": rf.json_schema.json_schema}
            else:
                tag = rf.format if rf.format is not None else {"structures": rf.structures or [],
                                                               "triggers": rf.triggers or []}
                given["response_format"] = {"structural_tag": tag}
        if self.structured_outputs is not None:
            so = self.structured_outputs
            given["structured_outputs"] = {k: v for k, v in {
                "json": so.json_, "regex": so.regex, "choice": so.choice, "grammar": so.grammar,
                "json_object": so.json_object, "structural_tag": so.structural_tag,
                "disable_any_whitespace": so.disable_any_whitespace}.items() if v is not None}
        for name, key in (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                          ("guided_grammar", "grammar"), ("structural_tag", "structural_tag")):
            if getattr(self, name) is not None:
                given[name] = {key: getattr(self, name)}
        if extra_json_schema is not None:  # forced tool calls: compact JSON, so no model can ramble in whitespace
            given["tool_choice"] = {"json": extra_json_schema, "disable_any_whitespace": True}
        if not given:
            if self.guided_decoding_backend is not None:
                raise bad_request("guided_decoding_backend needs a structured output to decode",
                                  "guided_decoding_backend")
            return None
        if len(given) > 1:
            raise bad_request(f"give one output constraint, not {' and '.join(given)}", list(given)[1])
        (field, kwargs), = given.items()
        try:
            return StructuredOutputsParams(**kwargs, backend=_backend_name(self.guided_decoding_backend))
        except ValueError as exc:
            raise bad_request(str(exc), field) from exc

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    def sampling_params(self, max_tokens: int | None, logprobs: int | None, prompt_logprobs: int | None = None,
                        n: int | None = None, defaults: dict | None = None) -> SamplingParams:
        """Raises ValueError (-> 400) for values the engine refuses. `defaults` (the model's generation config)
        fill the sampling fields the request leaves out."""
        defaults = defaults or {}

        def given_or_default(name: str, fallback):
            value = getattr(self, name)
            return value if value is not None else defaults.get(name, fallback)

        return SamplingParams(
            n=n or self.n, temperature=given_or_default("temperature", 1.0), top_p=given_or_default("top_p", 1.0),
            top_k=given_or_default("top_k", 0), min_p=given_or_default("min_p", 0.0), seed=self.seed,
            max_tokens=max_tokens, min_tokens=self.min_tokens,
            stop=self.stop, stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos,
            include_stop_str_in_output=self.include_stop_str_in_output,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            repetition_penalty=given_or_default("repetition_penalty", 1.0),
            logprobs=logprobs, prompt_logprobs=prompt_logprobs, skip_special_tokens=self.skip_special_tokens,
            logit_bias={int(k): v for k, v in self.logit_bias.items()} if self.logit_bias else None,
            allowed_token_ids=self.allowed_token_ids, bad_words=self.bad_words or None,
            truncate_prompt_tokens=self.truncate_prompt_tokens)


def _backend_name(name: str | None) -> str | None:
    """vLLM's per-request backend names: xgrammar, guidance (llguidance), auto."""
    if name is None:
        return None
    name = {"llguidance": "guidance"}.get(name, name)
    if name not in ("auto", "xgrammar", "guidance"):
        raise bad_request(f"guided_decoding_backend {name!r} is not available; use auto, xgrammar or guidance",
                          "guided_decoding_backend")
    return name


# ---- completions ------------------------------------------------------------------------------------------------
# Strict ints: `true` or `1.0` is not a token id.
TokenIds = list[Annotated[int, Field(strict=True)]]
PromptType = Union[TokenIds, list[TokenIds], str, list[str]]


class CompletionRequest(_SamplingFields):
    prompt: PromptType
    max_tokens: int | None = Field(16, ge=1)
    best_of: int | None = Field(None, ge=1, le=128)
    logprobs: int | None = Field(None, ge=0, le=20)
    prompt_logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None
    prompt_embeds: Any = None

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, value):
        if isinstance(value, list) and not value:
            raise ValueError("the prompt list is empty; give at least one prompt")
        return value

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value):
        if value:
            raise ValueError("suffix is not supported; leave it out")
        return value

    @model_validator(mode="after")
    def _best_of(self):
        if self.best_of is not None and self.best_of < self.n:
            raise ValueError(f"best_of ({self.best_of}) must be at least n ({self.n})")
        if self.best_of is not None and self.best_of > self.n and self.stream:
            raise ValueError("best_of larger than n cannot be streamed; set stream to false or best_of to n")
        return self


class CompletionLogProbs(OpenAIModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class UsageInfo(OpenAIModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: dict | None = None


class CompletionResponseChoice(OpenAIModel):
    index: int
    text: str
    logprobs: CompletionLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None
    prompt_logprobs: list[dict[int, Any] | None] | None = None


class CompletionResponse(OpenAIModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionResponseChoice]
    usage: UsageInfo


class CompletionResponseStreamChoice(OpenAIModel):
    index: int
    text: str
    logprobs: CompletionLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None


class CompletionStreamResponse(OpenAIModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionResponseStreamChoice]
    usage: UsageInfo | None = None


# ---- chat -------------------------------------------------------------------------------------------------------
class ChatContentPart(OpenAIModel):
    type: str
    text: str | None = None


class FunctionCall(OpenAIModel):
    name: str
    arguments: str | dict[str, Any] = "{}"


class ToolCall(OpenAIModel):
    id: str = Field(default_factory=lambda: random_id("chatcmpl-tool"))
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(OpenAIModel):
    role: str
    content: str | list[ChatContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None

    def as_template_input(self) -> dict:
        content = self.content
        if isinstance(content, list):
            other = sorted({part.type for part in content if part.type != "text"})
            if other:
                raise ValueError(f"content parts of type {', '.join(other)} cannot be read: this is a text-only "
                                 "model; send text parts only")
            content = "\n".join(part.text or "" for part in content)  # as vLLM joins text parts
        message = {"role": self.role, "content": content or ""}
        if self.name:
            message["name"] = self.name
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        if self.tool_calls:
            # Templates index the arguments as a mapping (Llama 3, Qwen2.5 write them back as JSON).
            message["tool_calls"] = [{"id": call.id, "type": "function", "function": {
                "name": call.function.name, "arguments": _arguments_dict(call.function.arguments)}}
                for call in self.tool_calls]
        return message


def _arguments_dict(arguments: str | dict) -> dict:
    if isinstance(arguments, dict):
        return arguments
    try:
        value = json.loads(arguments or "{}")
    except json.JSONDecodeError as exc:
        raise ValueError(f"a tool call's arguments are not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise ValueError("a tool call's arguments must be a JSON object")
    return value


class FunctionDefinition(OpenAIModel):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ChatTool(OpenAIModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(OpenAIModel):
    name: str


class NamedToolChoice(OpenAIModel):
    type: Literal["function"] = "function"
    function: NamedFunction


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    prompt_logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    best_of: int | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    documents: list[dict[str, Any]] | None = None
    tools: list[ChatTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = True
    reasoning_effort: Literal["minimal", "low", "medium", "high"] | None = None
    include_reasoning: bool = True

    @model_validator(mode="after")
    def _logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs set to true")
        if self.continue_final_message and self.add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt cannot both be true")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of is only implemented for /v1/completions; leave it out")
        return self

    @property
    def effective_tool_choice(self) -> str | NamedToolChoice:
        """OpenAI's default: "auto" when tools are given, else "none"."""
        if self.tool_choice is not None:
            return self.tool_choice
        return "auto" if self.tools else "none"


class ChatLogProb(OpenAIModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatLogProbsContent(ChatLogProb):
    top_logprobs: list[ChatLogProb] = Field(default_factory=list)


class ChatCompletionLogProbs(OpenAIModel):
    content: list[ChatLogProbsContent] | None = None


class ChatResponseMessage(OpenAIModel):
    role: str = "assistant"
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCall] = Field(default_factory=list)


class ChatCompletionResponseChoice(OpenAIModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatCompletionLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None


class ChatCompletionResponse(OpenAIModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionResponseChoice]
    usage: UsageInfo
    prompt_logprobs: list[dict[int, Any] | None] | None = None


class DeltaFunctionCall(OpenAIModel):
    name: str | None = None
    arguments: str | None = None

    @model_serializer(mode="wrap")
    def _drop_none(self, handler):
        return {k: v for k, v in handler(self).items() if v is not None}


class DeltaToolCall(OpenAIModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall | None = None

    @model_serializer(mode="wrap")
    def _drop_none(self, handler):
        return {k: v for k, v in handler(self).items() if v is not None}


class DeltaMessage(OpenAIModel):
    role: str | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None

    @model_serializer(mode="wrap")
    def _drop_none(self, handler):  # a delta carries only what changed, as OpenAI sends it
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatCompletionResponseStreamChoice(OpenAIModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatCompletionLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None


class ChatCompletionStreamResponse(OpenAIModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionResponseStreamChoice]
    usage: UsageInfo | None = None


# ---- models, tokenize -------------------------------------------------------------------------------------------
class ModelCard(OpenAIModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "npu_infer"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None


class ModelList(OpenAIModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeRequest(OpenAIModel):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        return self


class TokenizeResponse(OpenAIModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(OpenAIModel):
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(OpenAIModel):
    prompt: str
