"""What crosses from the engine to the workers each step, and back: plain data, picklable."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from npu_infer.sampling import SamplingParams


@dataclass
class SeqChunk:
    request_id: str
    token_ids: list[int]          # this step's new tokens
    start_pos: int                # tokens already in the KV cache before this step
    block_ids: list[int]
    sample: bool                  # the chunk reaches the newest token: sample the next one
    params: SamplingParams
    seed_index: int = 0           # which of the parent's n completions (offsets the seed)
    prompt_ids: list[int] | None = None   # for penalties and prompt logprobs only
    output_ids: list[int] | None = None
    num_prompt_tokens: int = 0


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
    finished_ids: list[str] = field(default_factory=list)  # drop their sampling state
    logits_masks: LogitsMasks | None = None


@dataclass
class StepOutput:
    sampled: dict[str, int] = field(default_factory=dict)
    logprobs: dict[str, tuple] = field(default_factory=dict)
    prompt_logprobs: dict[str, list] = field(default_factory=dict)
