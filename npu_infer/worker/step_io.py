"""What crosses from the engine to the workers each step, and back: plain data. A request's unchanging data
crosses once (NewRequest); each step then carries only what changed (SeqChunk: the new tokens, the new block ids),
so a step costs O(new tokens), not O(all tokens). Between the processes of one node it is pickled (a pipe to a
child we spawned); between nodes it travels as JSON of known types (encode_message / decode_message), so bytes
from the network are never unpickled."""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from npu_infer.sampling import SamplingParams


@dataclass
class NewRequest:
    """What a request's steps share, sent to the workers once: when it is first scheduled, and again when it
    resumes after a preemption (its block table then starts over). The workers keep it until it finishes."""
    request_id: str
    params: SamplingParams
    seed_index: int = 0                   # which of the parent's n completions (offsets the seed)
    num_prompt_tokens: int = 0
    token_ids: list[int] | None = None    # prompt + output so far, for penalties and prompt logprobs only


@dataclass
class SeqChunk:
    """One request's share of a step: only what changed since its last step."""
    request_id: str
    token_ids: list[int]          # this step's new tokens
    start_pos: int                # tokens already in the KV cache before this step
    new_block_ids: list[int]      # appended to the request's block table on the workers
    sample: bool                  # the chunk reaches the newest token: sample the next one


@dataclass
class LogitsMasks:
    """This step's logits edits for the sampled rows (engine/logits_rules.py builds them): a packed bitmask
    (bit t % 32 of word t // 32 set = token t allowed) per row of `mask_ids`, and sparse biases added to the
    logits (-inf bans a token)."""
    mask_ids: list[str]
    bitmask: np.ndarray | None          # int32 [len(mask_ids), ceil(vocab / 32)]
    bias_ids: list[str]                 # the request of each bias entry
    bias_tokens: np.ndarray             # int64
    bias_values: np.ndarray             # float32


@dataclass
class StepInput:
    chunks: list[SeqChunk]
    new_requests: list[NewRequest] = field(default_factory=list)  # before the chunks that name them
    finished_ids: list[str] = field(default_factory=list)  # the workers drop what they keep of these
    # Built by the engine's host-side rules (grammars, bans). In one process the model runner calls it after the
    # model's forward was queued, so on a device the host fills the bitmask while the device runs the forward (as
    # vLLM v1 asks for the grammar bitmask after dispatching execute_model); to worker processes it is sent built.
    logits_masks: LogitsMasks | Callable[[], LogitsMasks | None] | None = None

    def with_masks_built(self) -> StepInput:
        """This step with its logits masks built (what crosses a process boundary)."""
        if not callable(self.logits_masks):
            return self
        return dataclasses.replace(self, logits_masks=self.logits_masks())


@dataclass
class StepOutput:
    sampled: dict[str, int] = field(default_factory=dict)
    logprobs: dict[str, tuple] = field(default_factory=dict)
    prompt_logprobs: dict[str, list] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)  # request id -> why its own sampling/logprobs failed


# ---- the wire format between nodes ------------------------------------------------------------------------------
_PARAM_FIELDS = tuple(f.name for f in dataclasses.fields(SamplingParams))
_CHUNK_FIELDS = tuple(f.name for f in dataclasses.fields(SeqChunk))
_NEW_REQUEST_FIELDS = tuple(f.name for f in dataclasses.fields(NewRequest) if f.name != "params")


# The engine turns a grammar into this step's logits masks; the workers never read the grammar itself.
_ENGINE_ONLY_PARAMS = {"structured_outputs", "output_kind"}


def _plain_new_request(new: NewRequest) -> dict:
    plain = {name: getattr(new, name) for name in _NEW_REQUEST_FIELDS}
    plain["params"] = {name: getattr(new.params, name) for name in _PARAM_FIELDS if name not in _ENGINE_ONLY_PARAMS}
    return plain


def _plain_masks(masks: LogitsMasks | None) -> dict | None:
    if masks is None:
        return None
    return {"mask_ids": masks.mask_ids, "bitmask": None if masks.bitmask is None else masks.bitmask.tolist(),
            "bias_ids": masks.bias_ids, "bias_tokens": masks.bias_tokens.tolist(),
            "bias_values": masks.bias_values.tolist()}


def _masks(plain: dict | None) -> LogitsMasks | None:
    if plain is None:
        return None
    bitmask = None if plain["bitmask"] is None else np.asarray(plain["bitmask"], dtype=np.int32)
    return LogitsMasks(list(plain["mask_ids"]), bitmask, list(plain["bias_ids"]),
                       np.asarray(plain["bias_tokens"], dtype=np.int64), np.asarray(plain["bias_values"], dtype=np.float32))


def _new_request(plain: dict) -> NewRequest:
    params = SamplingParams(**{k: v for k, v in plain["params"].items() if k in _PARAM_FIELDS})
    return NewRequest(params=params, **{k: plain[k] for k in _NEW_REQUEST_FIELDS})


def encode_message(method: str, arg: object) -> bytes:
    """(method, argument) as JSON bytes; the argument a StepInput, a StepOutput, an int, a dict or None."""
    if isinstance(arg, StepInput):
        chunks = [{name: getattr(c, name) for name in _CHUNK_FIELDS} for c in arg.chunks]
        body = {"type": "StepInput", "chunks": chunks,
                "new_requests": [_plain_new_request(r) for r in arg.new_requests],
                "finished_ids": list(arg.finished_ids), "logits_masks": _plain_masks(arg.logits_masks)}
    elif isinstance(arg, StepOutput):
        body = {"type": "StepOutput", **dataclasses.asdict(arg)}
    elif arg is None or isinstance(arg, (int, float, str, dict)):
        body = {"type": "plain", "value": arg}
    else:
        raise TypeError(f"cannot send a {type(arg).__name__} to another node")
    return json.dumps([method, body], separators=(",", ":")).encode()


def decode_message(data: bytes) -> tuple[str, object]:
    """The inverse of encode_message; anything else is a ValueError (nothing is executed or imported)."""
    try:
        method, body = json.loads(data.decode("utf-8"))
        kind = body["type"]
        if kind == "StepInput":
            chunks = [SeqChunk(**{k: c[k] for k in _CHUNK_FIELDS}) for c in body["chunks"]]
            return method, StepInput(chunks, [_new_request(r) for r in body["new_requests"]],
                                     list(body["finished_ids"]), _masks(body.get("logits_masks")))
        if kind == "StepOutput":
            return method, StepOutput(**{f.name: body[f.name] for f in dataclasses.fields(StepOutput)})
        if kind == "plain":
            return method, body["value"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"a step message from another node is malformed: {type(exc).__name__}: {exc}") from None
    raise ValueError(f"a step message from another node has an unknown type {kind!r}")
