"""LLMEngine: schedule -> execute (sample) -> the scheduler applies the results (append, detokenize, stop checks,
free) -> outputs, one step at a time."""
from __future__ import annotations

import functools
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from npu_infer.config import EngineConfig
from npu_infer.engine.block_manager import BlockManager
from npu_infer.engine.detokenizer import IncrementalDetokenizer
from npu_infer.engine.logits_rules import RequestLogitsRules, gather_step_masks, make_rules
from npu_infer.engine.request import Request
from npu_infer.engine.scheduler import Scheduler
from npu_infer.engine.startup import resolve_engine_config
from npu_infer.loaders.hf_files import load_tokenizer
from npu_infer.generation_config import sampling_defaults
from npu_infer.outputs import CompletionOutput, Logprob, RequestOutput
from npu_infer.sampling import RequestOutputKind, SamplingParams
from npu_infer.worker.executor import make_executor
from npu_infer.worker.step_io import NewRequest, SeqChunk, StepInput

logger = logging.getLogger(__name__)


class RequestFailedError(RuntimeError):
    """One request's own computation failed (sampling, detokenization, logprobs, stop matching): that request
    ends with this error, the others in its batch go on."""


@dataclass
class EngineStats:
    """Counters the metrics endpoint and the tests read."""
    num_steps: int = 0
    batch_sizes: Counter = field(default_factory=Counter)  # sequences per step -> steps
    prompt_tokens: int = 0
    generation_tokens: int = 0
    finished_requests: int = 0

    @property
    def max_batch_size(self) -> int:
        return max(self.batch_sizes, default=0)


@dataclass
class ParentRequest:
    """One user request; its n completions run as n engine requests sharing the prompt."""
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    children: list[Request]
    prompt_logprobs: list | None = None
    prompt_logprobs_sent: bool = False  # DELTA outputs carry them once, in the first
    arrival_time: float = field(default_factory=time.monotonic)


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.platform = resolve_engine_config(config)
        self.sampling_defaults = sampling_defaults(config.generation_config, config.model_path,
                                                   config.override_generation_config)
        self.tokenizer = load_tokenizer(config)
        self.eos_token_ids = self._eos_ids(config.hf_config)
        start = time.monotonic()
        self.executor = make_executor(config)
        num_blocks = self.executor.num_blocks
        capacity = num_blocks * config.block_size
        if capacity < config.max_model_len:
            raise ValueError(f"the KV cache holds {capacity} tokens ({num_blocks} blocks) but one sequence may need "
                             f"max_model_len={config.max_model_len}; lower --max-model-len or give the cache more "
                             "memory (--gpu-memory-utilization / --kv-cache-memory)")
        self.executor.init_kv_cache(num_blocks)
        self.memory = self.executor.memory
        logger.info("KV cache: %d blocks x %d tokens = %d tokens; max concurrency at max_model_len %d: %.1fx "
                    "(engine ready in %.1f s)", num_blocks, config.block_size, capacity, config.max_model_len,
                    capacity / config.max_model_len, time.monotonic() - start)
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens,
                                   config.scheduling_policy, self.eos_token_ids, config.max_model_len)
        # The one table of live requests: user request id -> its state (each child carries its own detokenizer
        # and logits rules); an entry leaves when its request finishes, fails or is aborted.
        self.requests: dict[str, ParentRequest] = {}
        self.failures: dict[str, RequestFailedError] = {}  # user request id -> why it failed (until taken)
        self.stats = EngineStats()
        self.vocab_size = config.hf_config.vocab_size
        self._structured = None  # StructuredOutputManager, made on the first constrained request

    @property
    def structured_outputs(self):
        """The structured-output manager (backend per --structured-outputs-config, compiled-grammar cache)."""
        if self._structured is None:
            if self.tokenizer is None:
                raise ValueError("structured outputs need a tokenizer; it is off (skip_tokenizer_init)")
            from npu_infer.structured_output.manager import StructuredOutputManager
            self._structured = StructuredOutputManager(self.tokenizer, self.vocab_size, sorted(self.eos_token_ids),
                                                       self.config.structured_outputs_backend,
                                                       self.platform.host_worker_threads())
        return self._structured

    @property
    def reasoning_token_ids(self) -> tuple[int | None, int] | None:
        """(start, end) token ids of the reasoning that structured output waits out (--reasoning-parser)."""
        if self.config.reasoning_parser is None or self.tokenizer is None:
            return None
        from npu_infer.reasoning import reasoning_token_ids
        return reasoning_token_ids(self.config.reasoning_parser, self.tokenizer)

    # ---- requests -------------------------------------------------------------------------------------------
    def _eos_ids(self, hf_config) -> set[int]:
        ids: set[int] = set()
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        if not ids:  # no tokenizer: the model's own config
            eos = getattr(hf_config, "eos_token_id", None)
            ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        gen_config = Path(self.config.model_path) / "generation_config.json"
        if gen_config.is_file():
            import json
            eos = json.loads(gen_config.read_text()).get("eos_token_id")
            ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        return ids

    def tokenize_prompt(self, prompt: str | list[int] | dict) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            prompt = prompt["prompt"]
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("text prompts need a tokenizer; pass token ids when skip_tokenizer_init is set")
            return prompt, self.tokenizer.encode(prompt)
        return None, list(prompt)

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Refuse what cannot run, before anything is allocated."""
        max_len = self.config.max_model_len
        if params.truncate_prompt_tokens is not None:
            prompt_ids = prompt_ids[-params.truncate_prompt_tokens:]
        if not prompt_ids:
            raise ValueError("the prompt is empty; give at least one token")
        if any(not isinstance(t, int) or t < 0 or t >= self.vocab_size for t in prompt_ids):
            raise ValueError(f"prompt token ids must be integers in [0, {self.vocab_size})")
        if len(prompt_ids) >= max_len:
            raise ValueError(f"the prompt has {len(prompt_ids)} tokens but max_model_len is {max_len}; "
                             "shorten the prompt or raise --max-model-len")
        if params.max_tokens is not None and len(prompt_ids) + params.max_tokens > max_len:
            raise ValueError(f"this model's maximum context length is {max_len} tokens, but {len(prompt_ids)} "
                             f"prompt tokens + max_tokens {params.max_tokens} = "
                             f"{len(prompt_ids) + params.max_tokens}; lower max_tokens or shorten the prompt")
        if params.stop_strings and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; use stop_token_ids with skip_tokenizer_init")
        params.check_vocab(self.vocab_size)
        if params.structured_outputs is not None:
            params.structured_outputs.disable_any_whitespace |= self.config.structured_outputs_disable_any_whitespace
            self.structured_outputs.compile(params.structured_outputs)  # a bad schema is refused here, cached
        make_rules(params, prompt_ids, self.vocab_size, self.eos_token_ids, self.tokenizer)

    def _rules(self, params: SamplingParams, prompt_ids: list[int]) -> RequestLogitsRules | None:
        matcher = None
        if params.structured_outputs is not None:
            matcher = self.structured_outputs.matcher(params.structured_outputs)
        return make_rules(params, prompt_ids, self.vocab_size, self.eos_token_ids, self.tokenizer, matcher,
                          self.reasoning_token_ids)

    def add_request(self, request_id: str, prompt: str | list[int] | dict, params: SamplingParams,
                    priority: int = 0) -> None:
        """`priority`: lower runs first under --scheduling-policy priority (vLLM's meaning); else it must be 0."""
        if priority and self.config.scheduling_policy != "priority":
            raise ValueError(f"priority {priority} needs --scheduling-policy priority; leave it at 0")
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        text, prompt_ids = self.tokenize_prompt(prompt)
        if params.truncate_prompt_tokens is not None and len(prompt_ids) > params.truncate_prompt_tokens:
            text, prompt_ids = None, prompt_ids[-params.truncate_prompt_tokens:]  # keep the end, as vLLM
        self.validate(prompt_ids, params)
        salt = prompt.get("cache_salt") if isinstance(prompt, dict) else None
        children = []
        for i in range(params.n):
            detokenizer = None
            if self.tokenizer is not None and params.detokenize:
                detokenizer = IncrementalDetokenizer(self.tokenizer, prompt_ids, params.skip_special_tokens)
            children.append(Request(request_id if params.n == 1 else f"{request_id}#{i}", prompt_ids, params, text,
                                    index=i, parent_id=request_id, cache_salt=salt, priority=priority,
                                    detokenizer=detokenizer, logits_rules=self._rules(params, prompt_ids)))
        parent = ParentRequest(request_id, text, prompt_ids, params, children)
        if params.prompt_logprobs is not None:
            parent.prompt_logprobs = [None]
        self.requests[request_id] = parent
        for child in children:
            self.scheduler.add(child)
        self.stats.prompt_tokens += len(prompt_ids)

    def abort_request(self, request_id: str) -> None:
        """Stop a request wherever it is; its blocks go back to the pool now."""
        parent = self.requests.pop(request_id, None)
        if parent is None:
            return
        for child in parent.children:
            if self.scheduler.finish(child, "abort"):
                self.stats.finished_requests += 1

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # ---- the step -------------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        sched = self.scheduler.schedule()
        if not sched:
            return []
        masks = None
        rows = [(r.request_id, r.logits_rules, r.output_token_ids) for r, n in sched.scheduled
                if r.logits_rules is not None and r.num_computed_tokens + n == r.num_tokens]
        if rows:  # built by the model runner once the forward is queued (StepInput.logits_masks)
            masks = functools.partial(gather_step_masks, rows, self.vocab_size,
                                      lambda m, b: self.structured_outputs.fill_bitmask(m, b))
        new_requests: list[NewRequest] = []
        chunks = [self._chunk(r, n, new_requests) for r, n in sched.scheduled]
        step_input = StepInput(chunks, new_requests, self.scheduler.take_finished_req_ids(), masks)
        result = self.executor.execute(step_input)
        self.stats.num_steps += 1
        self.stats.batch_sizes[len(sched.scheduled)] += 1
        update = self.scheduler.update_from_output(sched.scheduled, result)
        self.stats.finished_requests += len(update.finished)
        self.stats.generation_tokens += len(update.new_tokens)
        for request, error in update.failed:
            parent = self.requests.get(request.parent_id)
            if parent is not None:
                self._fail(parent, RequestFailedError(error) if isinstance(error, str) else error)
        touched: dict[str, ParentRequest] = {}
        for request, start, rows in update.prompt_logprobs:
            parent = self.requests.get(request.parent_id)
            if parent is not None and request.index == 0:
                try:
                    self._add_prompt_logprobs(parent, start, rows)
                except Exception as exc:  # noqa: BLE001 -- this request's own failure: it alone ends
                    self._fail(parent, exc)
        for request, token, logprob_info in update.new_tokens:
            parent = self.requests.get(request.parent_id)
            if parent is None:  # failed in this step
                continue
            try:
                if logprob_info is not None:
                    self._add_logprobs(request, token, logprob_info)
            except Exception as exc:  # noqa: BLE001
                self._fail(parent, exc)
                continue
            touched[parent.request_id] = parent
        outputs = []
        for parent in touched.values():
            if parent.request_id not in self.requests:  # failed after its first child's token
                continue
            try:
                out = self._make_output(parent)
            except Exception as exc:  # noqa: BLE001
                self._fail(parent, exc)
                continue
            if out is not None:
                outputs.append(out)
        return outputs

    def _fail(self, parent: ParentRequest, exc: Exception) -> None:
        """End one request on an error of its own; its blocks go back, the rest of the batch is untouched."""
        logger.error("request %s failed: %s: %s", parent.request_id, type(exc).__name__, exc,
                     exc_info=not isinstance(exc, RequestFailedError))
        self.abort_request(parent.request_id)
        self.failures[parent.request_id] = exc if isinstance(exc, RequestFailedError) else RequestFailedError(
            f"request {parent.request_id} failed: {type(exc).__name__}: {exc}")

    def take_failures(self) -> dict[str, RequestFailedError]:
        """Requests that failed since the last call (user request id -> error); they are already freed."""
        failures, self.failures = self.failures, {}
        return failures

    def _add_prompt_logprobs(self, parent: ParentRequest, start: int, rows: list) -> None:
        """Rows for prompt positions start, start+1, ... (each about the next prompt token). A preempted request
        recomputes its prompt from position 0: the positions already recorded are skipped, so each prompt token
        has its entry exactly once."""
        have = len(parent.prompt_logprobs)  # entries for prompt tokens 0 .. have-1 (token 0 has None)
        skip = max(have - 1 - start, 0)
        rows = rows[skip:]
        first = start + skip + 1  # the prompt token the first remaining row is about
        if rows and first == have:
            parent.prompt_logprobs += self._to_logprob_dicts(rows, parent.prompt_token_ids[first:first + len(rows)])

    def _chunk(self, request: Request, num_new: int, new_requests: list[NewRequest]) -> SeqChunk:
        """This step's part of a request, as the workers need it: all its data the first time it is scheduled
        (and when it resumes after a preemption), then only the new tokens and the new block ids."""
        if request.num_blocks_on_workers is None:
            p = request.params
            history = p.has_penalties or p.prompt_logprobs is not None
            new_requests.append(NewRequest(request.request_id, p, request.index, request.num_prompt_tokens,
                                           list(request.token_ids) if history else None))
            request.num_blocks_on_workers = 0
        new_block_ids = request.block_ids[request.num_blocks_on_workers:]
        request.num_blocks_on_workers = len(request.block_ids)
        start = request.num_computed_tokens
        return SeqChunk(request.request_id, request.token_ids[start:start + num_new], start, new_block_ids,
                        start + num_new == request.num_tokens)

    def _add_logprobs(self, request: Request, token: int, logprob_info: tuple) -> None:
        request.cumulative_logprob += logprob_info[0]  # (chosen, rank, top ids, top values)
        request.logprobs.append(self._to_logprob_dicts([logprob_info], [token])[0])

    def _decode_one(self, token: int) -> str | None:
        return self.tokenizer.decode([token]) if self.tokenizer is not None else None

    def _to_logprob_dicts(self, rows: list, next_ids: list[int]) -> list[dict[int, Logprob]]:
        result = []
        for (chosen, rank, ids, vals), token in zip(rows, next_ids):
            entry = {token: Logprob(chosen, rank, self._decode_one(token))}
            for rank_i, (tid, val) in enumerate(zip(ids, vals), start=1):
                entry.setdefault(tid, Logprob(val, rank_i, self._decode_one(tid)))
            result.append(entry)
        return result

    def _make_output(self, parent: ParentRequest) -> RequestOutput | None:
        """The request's output after a step, as its output_kind asks (None: FINAL_ONLY and not finished yet).

        CUMULATIVE copies every token and logprob so far (O(output) a step); DELTA hands out only what is new
        (O(new tokens)), withholding text that a stop string may still cut, as vLLM's DELTA outputs do."""
        finished = all(c.is_finished for c in parent.children)
        kind = parent.params.output_kind
        if kind is RequestOutputKind.FINAL_ONLY and not finished:
            return None
        prompt_logprobs = parent.prompt_logprobs
        if kind is RequestOutputKind.DELTA:
            outputs = [_delta(c) for c in parent.children]
            if parent.prompt_logprobs_sent:
                prompt_logprobs = None
            parent.prompt_logprobs_sent = True
        else:
            outputs = [CompletionOutput(c.index, c.text, list(c.output_token_ids),
                                        c.cumulative_logprob if c.logprobs is not None else None,
                                        list(c.logprobs) if c.logprobs is not None else None,
                                        c.finish_reason, c.stop_reason) for c in parent.children]
        first = [c.first_token_time for c in parent.children if c.first_token_time]
        out = RequestOutput(parent.request_id, parent.prompt, parent.prompt_token_ids, outputs, finished,
                            prompt_logprobs, min(c.num_cached_tokens for c in parent.children),
                            {"arrival_time": parent.arrival_time, "first_token_time": min(first) if first else None})
        if finished:
            del self.requests[parent.request_id]
        return out

    def shutdown(self) -> None:
        self.executor.shutdown()


def stop_holdback(params: SamplingParams) -> int:
    """Characters of new text withheld from a DELTA output while a stop string may still cut them."""
    if params.include_stop_str_in_output:
        return 0
    return max((len(s) for s in params.stop_strings), default=1) - 1


def _delta(request: Request) -> CompletionOutput:
    """What is new in one completion since its last DELTA output."""
    start = request.num_output_tokens_sent
    request.num_output_tokens_sent = request.num_tokens - request.num_prompt_tokens
    text = request.text
    end = len(text) if request.is_finished else max(request.text_sent, len(text) - stop_holdback(request.params))
    new_text = text[request.text_sent:end]
    request.text_sent = max(request.text_sent, end)
    logprobs = request.logprobs[start:] if request.logprobs is not None else None
    return CompletionOutput(request.index, new_text, request.token_ids[request.num_prompt_tokens + start:],
                            request.cumulative_logprob if logprobs is not None else None, logprobs,
                            request.finish_reason, request.stop_reason)
