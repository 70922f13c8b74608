"""SamplingParams (vLLM's names and meanings) and the batched sampler."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from npu_infer.structured_output.params import StructuredOutputsParams


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0              # 0 or -1: off
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None         # top-k logprobs of each sampled token (plus the sampled one)
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    detokenize: bool = True
    structured_outputs: StructuredOutputsParams | None = None   # JSON schema / regex / choice / grammar
    logit_bias: dict[int, float] | None = None   # added to the token's logit before sampling (-100..100)
    allowed_token_ids: list[int] | None = None   # only these tokens may be sampled
    bad_words: list[str] | None = None           # never generate these words (as vLLM: alone or after a space)
    truncate_prompt_tokens: int | None = None    # keep only the prompt's last k tokens
    _stop_list: list[str] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"n must be at least 1, got {self.n}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be non-negative, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k == -1:
            self.top_k = 0
        if self.top_k < 0:
            raise ValueError(f"top_k must be 0 or -1 (off) or at least 1, got {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.min_tokens < 0 or (self.max_tokens is not None and self.min_tokens > self.max_tokens):
            raise ValueError(f"min_tokens must be in [0, max_tokens], got {self.min_tokens}")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise ValueError(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise ValueError(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        if not 0.0 < self.repetition_penalty <= 2.0:
            raise ValueError(f"repetition_penalty must be in (0, 2], got {self.repetition_penalty}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 20:
                raise ValueError(f"{name} must be between 0 and 20, got {value}")
        self._stop_list = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(not s for s in self._stop_list):
            raise ValueError("stop strings must not be empty")
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.logit_bias is not None:
            self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
            if any(not -100.0 <= v <= 100.0 for v in self.logit_bias.values()):
                raise ValueError("logit_bias values must be in [-100, 100]")
        if self.allowed_token_ids is not None and not self.allowed_token_ids:
            raise ValueError("allowed_token_ids must not be empty")
        if self.truncate_prompt_tokens is not None and self.truncate_prompt_tokens < 1:
            raise ValueError(f"truncate_prompt_tokens must be at least 1, got {self.truncate_prompt_tokens}")

    @property
    def stop_strings(self) -> list[str]:
        return self._stop_list

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    @property
    def has_penalties(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)


@dataclass
class SamplerRow:
    """What the sampler needs of one sequence this step."""
    params: SamplingParams
    generator: torch.Generator | None
    prompt_ids: list[int]
    output_ids: list[int]


@dataclass
class SamplerOutput:
    token_ids: list[int]
    # per row: (sampled token logprob, sampled token rank, top ids, top logprobs) or None
    logprobs: list[tuple[float, int, list[int], list[float]] | None]


def _apply_penalties(logits: torch.Tensor, rows: list[SamplerRow]) -> torch.Tensor:
    vocab = logits.shape[1]
    for i, row in enumerate(rows):
        p = row.params
        if not p.has_penalties:
            continue
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(row.prompt_ids) | set(row.output_ids)), dtype=torch.long)
            seen = seen[seen < vocab]
            values = logits[i, seen]
            logits[i, seen] = torch.where(values > 0, values / p.repetition_penalty, values * p.repetition_penalty)
        if row.output_ids and (p.presence_penalty or p.frequency_penalty):
            counts = torch.bincount(torch.tensor(row.output_ids, dtype=torch.long), minlength=vocab)[:vocab]
            counts = counts.to(logits.dtype)
            logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def _top_k_top_p_min_p(logits: torch.Tensor, rows: list[SamplerRow]) -> torch.Tensor:
    top_k = [r.params.top_k for r in rows]
    top_p = [r.params.top_p for r in rows]
    min_p = [r.params.min_p for r in rows]
    if any(top_k):
        k = torch.tensor([k if k else logits.shape[1] for k in top_k]).clamp(max=logits.shape[1])
        kth = logits.sort(dim=-1, descending=True).values.gather(1, (k - 1).unsqueeze(1))
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if any(p < 1.0 for p in top_p):
        p = torch.tensor(top_p, dtype=logits.dtype).unsqueeze(1)
        sorted_logits, order = logits.sort(dim=-1, descending=False)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= 1 - p
        drop[:, -1] = False  # always keep the most likely token
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    if any(min_p):
        probs = logits.softmax(dim=-1)
        threshold = torch.tensor(min_p, dtype=probs.dtype).unsqueeze(1) * probs.max(dim=-1, keepdim=True).values
        logits = logits.masked_fill(probs < threshold, float("-inf"))
    return logits


def _logprob_info(logprobs: torch.Tensor, tokens: torch.Tensor, k: int):
    """Logprob and rank (1 = most likely) of each chosen token, and the top-k alternatives."""
    chosen = logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1)
    ranks = (logprobs > chosen.unsqueeze(1)).sum(dim=1) + 1
    top = logprobs.topk(k, dim=-1) if k else None
    return chosen, ranks, top


def sample(logits: torch.Tensor, rows: list[SamplerRow]) -> SamplerOutput:
    """Sample one token per row. Seeded rows draw from their own generator, so a request's tokens do not
    depend on what else is in the batch."""
    logits = logits.float()
    want_logprobs = [r.params.logprobs for r in rows]
    raw_logprobs = logits.log_softmax(dim=-1) if any(x is not None for x in want_logprobs) else None
    if all(r.params.greedy and not r.params.has_penalties for r in rows):
        tokens = logits.argmax(dim=-1)  # the common fast path: no copies, no sort
    else:
        logits = _apply_penalties(logits.clone(), rows)
        greedy_rows = torch.tensor([r.params.greedy for r in rows])
        temperature = torch.tensor([1.0 if r.params.greedy else r.params.temperature for r in rows])
        scaled = _top_k_top_p_min_p(logits / temperature.unsqueeze(1), rows)
        probs = scaled.softmax(dim=-1)
        # Exponential race (Gumbel-max equivalent): argmax(p / q), q ~ Exp(1), one draw per row.
        noise = torch.empty_like(probs).exponential_()
        for i, row in enumerate(rows):
            if row.generator is not None:  # seeded rows draw on the host from their own stream
                noise[i] = torch.empty(probs.shape[1]).exponential_(generator=row.generator).to(noise.device)
        sampled = probs.div(noise).argmax(dim=-1)
        tokens = torch.where(greedy_rows, logits.argmax(dim=-1), sampled)
    token_list = tokens.tolist()
    out_logprobs: list = [None] * len(rows)
    if raw_logprobs is not None:
        k = max(x or 0 for x in want_logprobs)
        chosen, ranks, top = _logprob_info(raw_logprobs, tokens, k)
        for i, want in enumerate(want_logprobs):
            if want is None:
                continue
            ids = top.indices[i, :want].tolist() if want else []
            vals = top.values[i, :want].tolist() if want else []
            out_logprobs[i] = (chosen[i].item(), int(ranks[i]), ids, vals)
    return SamplerOutput(token_list, out_logprobs)


def prompt_logprobs(logits: torch.Tensor, next_ids: list[int], k: int):
    """For each prompt position: logprob/rank of the actual next prompt token, and the top-k."""
    logprobs = logits.float().log_softmax(dim=-1)
    chosen, ranks, top = _logprob_info(logprobs, torch.tensor(next_ids), k)
    result = []
    for i in range(len(next_ids)):
        ids = top.indices[i].tolist() if k else []
        vals = top.values[i].tolist() if k else []
        result.append((chosen[i].item(), int(ranks[i]), ids, vals))
    return result
