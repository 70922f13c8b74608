"""ModelRunner: turns one step's chunks into flat tensors (no padding), runs the model, samples."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from npu_infer.distributed.parallel_state import get_pp_group
from npu_infer.platform import current_platform
from npu_infer.sampling import SamplerRow, prompt_logprobs, sample
from npu_infer.worker.context import AttentionMetadata, set_context
from npu_infer.worker.logits_masks import apply_logits_masks
from npu_infer.worker.step_io import LogitsMasks, SeqChunk, StepInput, StepOutput


PROMPT_LOGPROBS_ROWS = 256  # prompt positions whose logits exist at once (profile_run includes one such slice)


class ModelRunner:
    def __init__(self, model: nn.Module, device: torch.device, block_size: int, hidden_size: int,
                 dtype: torch.dtype):
        self.model = model
        self.device = device
        self.block_size = block_size
        self.hidden_size = hidden_size
        self.dtype = dtype
        self.generators: dict[str, torch.Generator] = {}
        self._pinned: list[torch.Tensor] = []  # one pinned host buffer per step input (_to_device)
        self._staged: list[torch.Tensor] = []

    def prepare(self, chunks: list[SeqChunk]) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """Flatten all sequences of the step into one token dimension; decodes first."""
        bs = self.block_size
        query_lens = [len(c.token_ids) for c in chunks]
        seq_lens = [c.start_pos + n for c, n in zip(chunks, query_lens)]
        num_decodes = 0
        while num_decodes < len(chunks) and query_lens[num_decodes] == 1:
            num_decodes += 1
        input_ids = np.fromiter((t for c in chunks for t in c.token_ids), dtype=np.int64)
        positions = np.concatenate([np.arange(c.start_pos, s) for c, s in zip(chunks, seq_lens)])
        max_blocks = max(len(c.block_ids) for c in chunks)
        block_tables = np.zeros((len(chunks), max_blocks), dtype=np.int32)
        for i, c in enumerate(chunks):
            block_tables[i, :len(c.block_ids)] = c.block_ids
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
        for request_id in step.finished_ids:
            self.generators.pop(request_id, None)
        # Decodes first (the attention backends split the batch there); keep the engine's order otherwise.
        chunks = sorted(step.chunks, key=lambda c: len(c.token_ids) != 1)
        self._staged.clear()
        input_ids, positions, meta = self.prepare(chunks)
        pp = get_pp_group()
        hidden = residual = None
        if not pp.is_first_rank:
            shape = (input_ids.shape[0], self.hidden_size)
            hidden = pp.recv(shape, self.dtype, pp.prev_rank, self.device)
            residual = pp.recv(shape, self.dtype, pp.prev_rank, self.device)
        set_context(meta)
        try:
            hidden, residual = self.model(input_ids, positions, hidden, residual)
        finally:
            set_context(None)
        if not pp.is_last_rank:
            pp.send(hidden, pp.next_rank)
            pp.send(residual, pp.next_rank)
            current_platform().synchronize()  # nothing here waits for the device: the pinned inputs must be read
            return None
        return self._sample(chunks, hidden, meta, step.logits_masks)

    def _sample(self, chunks: list[SeqChunk], hidden: torch.Tensor, meta: AttentionMetadata,
                masks: LogitsMasks | None = None) -> StepOutput:
        out = StepOutput()
        rows = [i for i, c in enumerate(chunks) if c.sample]
        if rows:
            last_token = np.cumsum(meta.query_lens_cpu)[rows] - 1  # each sampled row's newest token
            logits = self.model.compute_logits(hidden[torch.from_numpy(last_token).to(self.device)])
            if masks is not None:  # structured outputs, allowed ids, bad words, logit_bias, min_tokens
                logits = apply_logits_masks(logits.float(), masks, {chunks[i].request_id: j for j, i in enumerate(rows)})
            sampler_rows = [SamplerRow(chunks[i].params, self._generator(chunks[i]), chunks[i].prompt_ids or [],
                                       chunks[i].output_ids or []) for i in rows]
            result = sample(logits, sampler_rows)
            for j, i in enumerate(rows):
                out.sampled[chunks[i].request_id] = result.token_ids[j]
                if result.logprobs[j] is not None:
                    out.logprobs[chunks[i].request_id] = result.logprobs[j]
        start = 0
        for c, q_len in zip(chunks, meta.query_lens_cpu):
            k = c.params.prompt_logprobs
            # Positions whose next token is still a prompt token get a prompt logprob.
            last = min(c.start_pos + q_len, c.num_prompt_tokens - 1)
            if k is not None and last > c.start_pos:
                n = last - c.start_pos
                next_ids = c.prompt_ids[c.start_pos + 1:last + 1]
                result = out.prompt_logprobs[c.request_id] = []
                # In slices: a whole chunk's [tokens, vocab] float32 logits could outgrow what profile_run measured.
                for i in range(0, n, PROMPT_LOGPROBS_ROWS):
                    rows = slice(start + i, start + min(i + PROMPT_LOGPROBS_ROWS, n))
                    logits = self.model.compute_logits(hidden[rows])
                    result += prompt_logprobs(logits, next_ids[i:i + PROMPT_LOGPROBS_ROWS], k)
            start += q_len
        return out

    def _generator(self, chunk: SeqChunk) -> torch.Generator | None:
        if chunk.params.seed is None:
            return None
        gen = self.generators.get(chunk.request_id)
        if gen is None:
            gen = torch.Generator(device=self.device).manual_seed(chunk.params.seed + chunk.seed_index)
            self.generators[chunk.request_id] = gen
        return gen
