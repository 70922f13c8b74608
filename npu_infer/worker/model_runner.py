"""ModelRunner: keeps each running request's block table and sampling data between steps, turns one step's
chunks into flat tensors (no padding) and the attention backend's metadata (built once per step), runs the model,
samples."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from npu_infer.distributed.parallel_state import get_pp_group
from npu_infer.models.layers.attention import attention_layers
from npu_infer.platform import current_platform
from npu_infer.sampling import SamplerRow, SamplingParams, prompt_logprobs, sample
from npu_infer.worker.context import AttentionMetadata, set_context
from npu_infer.worker.logits_masks import apply_logits_masks
from npu_infer.worker.step_io import LogitsMasks, SeqChunk, StepInput, StepOutput


PROMPT_LOGPROBS_ROWS = 256  # prompt positions whose logits exist at once (profile_run includes one such slice)


@dataclass
class CachedRequest:
    """What a worker keeps of a running request between steps: its NewRequest, then each chunk's changes."""
    request_id: str
    params: SamplingParams
    seed_index: int
    num_prompt_tokens: int
    token_ids: list[int] | None         # prompt + output, kept only for penalties and prompt logprobs
    block_ids: list[int] = field(default_factory=list)

    def apply(self, chunk: SeqChunk) -> None:
        self.block_ids += chunk.new_block_ids
        if self.token_ids is not None:
            if chunk.start_pos > len(self.token_ids):
                raise RuntimeError(f"request {self.request_id}: a chunk starts at token {chunk.start_pos} but this "
                                   f"worker holds {len(self.token_ids)} (the engine and the worker disagree)")
            self.token_ids[chunk.start_pos:chunk.start_pos + len(chunk.token_ids)] = chunk.token_ids

    def prompt_ids(self) -> list[int]:
        return self.token_ids[:self.num_prompt_tokens] if self.token_ids is not None else []

    def output_ids(self, end: int) -> list[int]:
        """The output tokens before position `end`, for penalties."""
        return self.token_ids[self.num_prompt_tokens:end] if self.token_ids is not None else []


class ModelRunner:
    def __init__(self, model: nn.Module, device: torch.device, block_size: int, hidden_size: int,
                 dtype: torch.dtype):
        self.model = model
        # All attention layers of a model share one head size and dtype, hence one backend: its builder makes each
        # step's metadata once, for every layer.
        layers = attention_layers(model) if model is not None else []
        self.attn_backend = layers[0].backend if layers else None
        self.device = device
        self.block_size = block_size
        self.hidden_size = hidden_size
        self.dtype = dtype
        self.requests: dict[str, CachedRequest] = {}
        self.generators: dict[str, torch.Generator] = {}  # kept across a preemption: the draws go on
        self._pinned: list[torch.Tensor] = []  # one pinned host buffer per step input (_to_device)
        self._staged: list[torch.Tensor] = []
        self._ops = None  # the platform's fused_ops(): masks and greedy argmax (see fused_ops)

    @property
    def fused_ops(self):
        """The platform's fused ops, taken once, on the first sampling step (profile_run's, inside the engine
        that decided the platform): later steps may run where no platform is current (a test's module-scoped
        engine, say)."""
        if self._ops is None:
            self._ops = current_platform().fused_ops()
        return self._ops

    def update_requests(self, step: StepInput) -> None:
        """Apply the step's changes to the requests this worker keeps: drop the finished, (re)start the new and
        the resumed, extend the running ones' block tables and tokens."""
        self.forget(step.finished_ids)
        for new in step.new_requests:
            self.requests[new.request_id] = CachedRequest(
                new.request_id, new.params, new.seed_index, new.num_prompt_tokens,
                list(new.token_ids) if new.token_ids is not None else None)
        for chunk in step.chunks:
            state = self.requests.get(chunk.request_id)
            if state is None:
                raise RuntimeError(f"the step names request {chunk.request_id}, which this worker does not hold "
                                   "(no NewRequest came for it, or it has finished)")
            state.apply(chunk)

    def forget(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self.requests.pop(request_id, None)
            self.generators.pop(request_id, None)

    def prepare(self, chunks: list[SeqChunk], tables: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor,
                                                                                 AttentionMetadata]:
        """Flatten all sequences of the step into one token dimension; decodes first. `tables`: each chunk's
        whole block table."""
        bs = self.block_size
        query_lens = [len(c.token_ids) for c in chunks]
        seq_lens = [c.start_pos + n for c, n in zip(chunks, query_lens)]
        num_decodes = 0
        while num_decodes < len(chunks) and query_lens[num_decodes] == 1:
            num_decodes += 1
        input_ids = np.fromiter((t for c in chunks for t in c.token_ids), dtype=np.int64)
        positions = np.concatenate([np.arange(c.start_pos, s) for c, s in zip(chunks, seq_lens)])
        max_blocks = max(len(t) for t in tables)
        block_tables = np.zeros((len(chunks), max_blocks), dtype=np.int32)
        for i, table in enumerate(tables):
            block_tables[i, :len(table)] = table
        row_of_token = np.repeat(np.arange(len(chunks)), query_lens)
        slot_mapping = block_tables[row_of_token, positions // bs].astype(np.int64) * bs + positions % bs
        query_start_loc = np.zeros(len(chunks) + 1, dtype=np.int32)
        np.cumsum(query_lens, out=query_start_loc[1:])
        to = self._to_device
        meta = AttentionMetadata(
            slot_mapping=to(slot_mapping), query_start_loc=to(query_start_loc),
            seq_lens=to(np.asarray(seq_lens, dtype=np.int32)), block_tables=to(block_tables),
            query_lens_cpu=query_lens, seq_lens_cpu=seq_lens, num_decodes=num_decodes,
            num_decode_tokens=num_decodes, max_query_len=max(query_lens), max_seq_len=max(seq_lens), block_size=bs)
        return to(input_ids), to(positions), meta

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        """A device copy of one step input, made asynchronously through a pinned host buffer kept for it.

        A non_blocking copy from ordinary host memory is unsafe on NPU: torch_npu queues it without checking that
        the memory is pinned, and the numpy temporary may be freed or reused before the copy reads it.  The pinned
        buffers are reused each step; a step's copies have finished before the next step writes them (the
        sampler's .tolist() waits for the device; ranks that do not sample synchronize in execute()).  On the CPU
        backend the array itself is the step's tensor."""
        if self.device.type == "cpu":
            return torch.from_numpy(array)
        source = torch.from_numpy(array)
        slot = len(self._staged)
        if slot == len(self._pinned):
            self._pinned.append(torch.empty(0, dtype=torch.uint8))
        buffer = self._pinned[slot]
        if buffer.numel() < source.nbytes:  # grows to the largest step seen; sizes are bounded by the config
            buffer = self._pinned[slot] = torch.empty(max(source.nbytes, 2 * buffer.numel()), dtype=torch.uint8,
                                                      pin_memory=True)
        staged = buffer[:source.nbytes].view(source.dtype).view(source.shape)
        staged.copy_(source)
        self._staged.append(staged)
        return staged.to(self.device, non_blocking=True)

    @torch.inference_mode()
    def execute(self, step: StepInput) -> StepOutput | None:
        self.update_requests(step)
        # Decodes first (the attention backends split the batch there); keep the engine's order otherwise.
        chunks = sorted(step.chunks, key=lambda c: len(c.token_ids) != 1)
        self._staged.clear()
        input_ids, positions, meta = self.prepare(chunks, [self.requests[c.request_id].block_ids for c in chunks])
        pp = get_pp_group()
        hidden = residual = None
        if not pp.is_first_rank:
            shape = (input_ids.shape[0], self.hidden_size)
            hidden = pp.recv(shape, self.dtype, pp.prev_rank, self.device)
            residual = pp.recv(shape, self.dtype, pp.prev_rank, self.device)
        set_context(self.attn_backend.build_metadata(meta))  # once per step; the layers only read it
        try:
            hidden, residual = self.model(input_ids, positions, hidden, residual)
        finally:
            set_context(None)
        if not pp.is_last_rank:
            pp.send(hidden, pp.next_rank)
            pp.send(residual, pp.next_rank)
            current_platform().synchronize()  # nothing here waits for the device: the pinned inputs must be read
            return None
        # Built now, after the forward was queued: a device runs it while the host fills the bitmask.
        masks = step.logits_masks() if callable(step.logits_masks) else step.logits_masks
        return self._sample(chunks, hidden, meta, masks)

    def _sample(self, chunks: list[SeqChunk], hidden: torch.Tensor, meta: AttentionMetadata,
                masks: LogitsMasks | None = None) -> StepOutput:
        out = StepOutput()
        rows = [i for i, c in enumerate(chunks) if c.sample]
        if rows:
            last_token = np.cumsum(meta.query_lens_cpu)[rows] - 1  # each sampled row's newest token
            logits = self.model.compute_logits(hidden[torch.from_numpy(last_token).to(self.device)])
            if masks is not None:  # structured outputs, allowed ids, bad words, logit_bias, min_tokens
                logits = apply_logits_masks(logits.float(), masks, {chunks[i].request_id: j for j, i in enumerate(rows)},
                                            self.fused_ops)
            try:
                results = self._sample_rows([chunks[i] for i in rows], logits)
            except Exception:  # noqa: BLE001 -- one row's failure: sample row by row, so only that row fails
                results = []
                for j, i in enumerate(rows):
                    try:
                        results.append(self._sample_rows([chunks[i]], logits[j:j + 1])[0])
                    except Exception as exc:  # noqa: BLE001
                        out.errors[chunks[i].request_id] = f"sampling failed: {type(exc).__name__}: {exc}"
                        results.append(None)
            for i, result in zip(rows, results):
                if result is not None:
                    token, logprobs = result
                    out.sampled[chunks[i].request_id] = token
                    if logprobs is not None:
                        out.logprobs[chunks[i].request_id] = logprobs
        start = 0
        for c, q_len in zip(chunks, meta.query_lens_cpu):
            state = self.requests[c.request_id]
            k = state.params.prompt_logprobs
            # Positions whose next token is still a prompt token get a prompt logprob.
            last = min(c.start_pos + q_len, state.num_prompt_tokens - 1)
            if k is not None and last > c.start_pos and c.request_id not in out.errors:
                n = last - c.start_pos
                next_ids = state.token_ids[c.start_pos + 1:last + 1]
                try:
                    result = []
                    # In slices: a whole chunk's [tokens, vocab] float32 logits could outgrow what profile_run measured.
                    for i in range(0, n, PROMPT_LOGPROBS_ROWS):
                        rows = slice(start + i, start + min(i + PROMPT_LOGPROBS_ROWS, n))
                        logits = self.model.compute_logits(hidden[rows])
                        result += prompt_logprobs(logits, next_ids[i:i + PROMPT_LOGPROBS_ROWS], k)
                    out.prompt_logprobs[c.request_id] = result
                except Exception as exc:  # noqa: BLE001 -- this request's own failure
                    out.errors[c.request_id] = f"prompt logprobs failed: {type(exc).__name__}: {exc}"
            start += q_len
        return out

    def _sample_rows(self, chunks: list[SeqChunk], logits: torch.Tensor) -> list[tuple[int, tuple | None]]:
        """(token, logprob info) per chunk, sampled as one batch."""
        rows = []
        for c in chunks:
            state = self.requests[c.request_id]
            rows.append(SamplerRow(state.params, self._generator(state), state.prompt_ids(),
                                   state.output_ids(c.start_pos + len(c.token_ids))))
        result = sample(logits, rows, self.fused_ops)
        return list(zip(result.token_ids, result.logprobs))

    def _generator(self, state: CachedRequest) -> torch.Generator | None:
        if state.params.seed is None:
            return None
        gen = self.generators.get(state.request_id)
        if gen is None:
            gen = torch.Generator(device=self.device).manual_seed(state.params.seed + state.seed_index)
            self.generators[state.request_id] = gen
        return gen
