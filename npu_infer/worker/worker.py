"""Worker: one device's share of the model — device and distributed init, load, profile_run, KV cache."""
from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from npu_infer.config import EngineConfig
from npu_infer.distributed.parallel_state import get_pp_group, get_tp_group, init_model_parallel
from npu_infer.loaders import load_weights
from npu_infer.models.registry import get_model_class
from npu_infer.platform import current_platform
from npu_infer.sampling import SamplingParams
from npu_infer.worker.model_runner import ModelRunner
from npu_infer.worker.step_io import NewRequest, SeqChunk, StepInput, StepOutput

logger = logging.getLogger(__name__)
GiB = 1024**3


def _gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


class Worker:
    def __init__(self, config: EngineConfig, rank: int = 0, local_rank: int = 0, init_method: str | None = None):
        self.config = config
        self.platform = current_platform()  # decided at the start of this process
        self.rank = rank
        self.local_rank = local_rank
        self.init_method = init_method
        self.device = self.platform.device(local_rank)
        self.model = None
        self.runner: ModelRunner | None = None
        self.kv_caches: list[torch.Tensor] = []
        self.memory: dict[str, int] = {}
        self.cpu_group = None  # gloo group of every rank, for scalar agreements (min_across_ranks)

    def init_device(self) -> None:
        self.platform.set_device(self.device)
        if self.config.world_size > 1 and not dist.is_initialized():
            dist.init_process_group(self.platform.dist_backend, init_method=self.init_method,
                                    world_size=self.config.world_size, rank=self.rank)
        init_model_parallel(self.config.tensor_parallel_size, self.config.pipeline_parallel_size, self.rank)
        if self.config.world_size > 1:
            self.cpu_group = dist.new_group(backend="gloo")
            self._warm_up_device_groups()
        torch.manual_seed(self.config.seed)
        # The seed's total_npu_memory / init_npu_memory: read before anything of ours is on the device.
        self.memory["init_free"], self.memory["total"] = self.platform.mem_get_info()

    def _warm_up_device_groups(self) -> None:
        """Create the device communicators now: HCCL/NCCL make them on first use, and each takes device memory
        (HCCL: 2 x HCCL_BUFFSIZE, 400 MiB by default) that must be gone from the free memory before it is read."""
        one = torch.zeros(1, device=self.device)
        get_tp_group().all_reduce(one)
        pp = get_pp_group()
        if pp.world_size > 1:  # p2p pairs get their own communicators: one round along the pipeline
            if not pp.is_first_rank:
                pp.recv((1,), one.dtype, pp.prev_rank, self.device)
            if not pp.is_last_rank:
                pp.send(one, pp.next_rank)
        self.platform.synchronize()

    def load_model(self) -> None:
        hf = self.config.hf_config
        model_cls = get_model_class(hf)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(self.config.torch_dtype)
        try:
            with torch.device(self.device):
                self.model = model_cls(hf)
        finally:
            torch.set_default_dtype(previous)
        load_weights(self.model, self.config, self.rank)
        self.model.eval()
        self.platform.prepare_model(self.model, self.config.torch_dtype)
        self.memory["weights"] = sum(p.numel() * p.element_size() for p in self.model.parameters())
        self.runner = ModelRunner(self.model, self.device, self.config.block_size, hf.hidden_size,
                                  self.config.torch_dtype)

    def _attention_layers(self) -> list:
        from npu_infer.models.layers.attention import attention_layers
        return attention_layers(self.model)

    # Every sampling feature that allocates per step: penalties ([rows, vocab] masks), top-k/p, min-p, seeded draws,
    # top-20 logprobs, and prompt logprobs (in ModelRunner's slices of PROMPT_LOGPROBS_ROWS positions).
    _PROFILE_PARAMS = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, min_p=0.05, repetition_penalty=1.1,
                                     presence_penalty=0.5, frequency_penalty=0.5, seed=0, logprobs=20,
                                     prompt_logprobs=20, max_tokens=1)

    def profile_run(self) -> None:
        """The largest steps the scheduler can produce, sampling included: every sequence a fresh prefill with no
        KV cache, then one step through the paged path at the longest context (_profile_paged_step).  Each
        pass's allocator peak is kept in self.memory ("peak_fresh", "peak_paged") for the budget and its log."""
        platform = self.platform
        self._profile_fresh_prefill()
        self.memory["peak_fresh"] = platform.peak_memory()
        platform.reset_peak_memory()
        self._profile_paged_step()
        self.memory["peak_paged"] = platform.peak_memory() if platform.profile_paged_step else None

    def _profile_fresh_prefill(self) -> None:
        """max_num_batched_tokens tokens over max_num_seqs fresh prompts, no KV cache."""
        cfg = self.config
        num_tokens, num_seqs = cfg.max_num_batched_tokens, min(cfg.max_num_seqs, cfg.max_num_batched_tokens)
        # No dummy sequence may be longer than a real one can be.
        lengths = [min(num_tokens // num_seqs + (1 if i < num_tokens % num_seqs else 0), cfg.max_model_len)
                   for i in range(num_seqs)]
        # Each dummy prompt is one token longer than what the step computes of it, so every computed position
        # gets a prompt logprob; the prompt is the penalties' history.
        new = [NewRequest(f"profile-{i}", self._PROFILE_PARAMS, num_prompt_tokens=n + 1, token_ids=[0] * (n + 1))
               for i, n in enumerate(lengths)]
        chunks = [SeqChunk(f"profile-{i}", [0] * n, 0, [0] * -(-n // cfg.block_size), True)
                  for i, n in enumerate(lengths)]
        self._profile_step(StepInput(chunks, new))

    def _profile_paged_step(self) -> None:
        """One step through the paged attention path that bounds every step serving can make there: max_num_seqs
        decodes and a chunked prefill of max_num_batched_tokens, every sequence max_model_len long.

        The no-cache prefill never meets what grows with the context: on the plain-torch backend (CUDA) the
        decodes' K/V gathered and padded to the longest sequence, and a chunk's whole context K/V
        [2, L, KV heads, head_dim] with its SDPA mask [chunk, L], per layer; the penalties' histories of that
        length; a full slice of prompt logprobs while the batch's sampled logits still live.  A real step has
        at most max_num_seqs sequences and max_num_batched_tokens tokens; this one has one sequence and up to
        max_num_seqs tokens more: a little larger than any real step, on the safe side.  Every block-table entry
        names block 0 of a one-block temporary cache: serving's shapes without a cache that size (the block
        stays in the measured peak: one block less of KV cache).  Skipped where the platform says so (CPU)."""
        cfg = self.config
        context = cfg.max_model_len
        chunk = min(cfg.max_num_batched_tokens, context - 1)  # >= 1 token of context before it: the gather path
        if chunk < 2 or not self.platform.profile_paged_step:  # contexts of 2 tokens: nothing longer to profile
            return
        num_decodes = cfg.max_num_seqs
        layers = self._attention_layers()
        backend, empty = layers[0].backend, [attn.kv_cache for attn in layers]
        for attn in layers:
            shape = backend.kv_cache_shape(1, cfg.block_size, attn.num_kv_heads, attn.head_dim)
            attn.kv_cache = torch.zeros(shape, dtype=cfg.torch_dtype, device=self.device)
        table = [0] * -(-context // cfg.block_size)
        ids = [f"profile-paged-{i}" for i in range(num_decodes + 1)]
        # The whole context is prompt: the chunk gets chunk - 1 prompt logprobs, the penalties a full history.
        new = [NewRequest(i, self._PROFILE_PARAMS, num_prompt_tokens=context, token_ids=[0] * context) for i in ids]
        chunks = [SeqChunk(i, [0], context - 1, table, True) for i in ids[:-1]]
        chunks.append(SeqChunk(ids[-1], [0] * chunk, context - chunk, table, True))
        try:
            self._profile_step(StepInput(chunks, new))
        finally:
            for attn, cache in zip(layers, empty):
                attn.kv_cache = cache

    def _profile_step(self, step: StepInput) -> None:
        try:
            out = self.runner.execute(step)
        finally:
            self.runner.forget([r.request_id for r in step.new_requests])
        if out is not None and out.errors:  # a dummy row cannot be at fault: any failure here is the engine's own
            raise RuntimeError(f"profile_run failed: {next(iter(out.errors.values()))}")
        self.platform.synchronize()

    def determine_num_blocks(self) -> int:
        """KV blocks this rank can hold: total * utilization - peak, or exactly --kv-cache-memory.

        The device's free memory counts what the caching allocator holds (reserved), not only what tensors use
        (allocated): it is read after empty_cache(), when reserved is back to what lives on, so the profile run's
        activations are counted once, as the allocator's peak above what lives on."""
        cfg, mem, platform = self.config, self.memory, self.platform
        platform.empty_cache()
        platform.reset_peak_memory()
        in_use_before = platform.memory_in_use()
        self.profile_run()
        # The higher of the two passes' peaks (profile_run resets the peak between them).
        peak_in_use = max(mem.get("peak_fresh", 0), platform.peak_memory())
        in_use_now = platform.memory_in_use()
        platform.empty_cache()
        free_now, _ = platform.mem_get_info()
        mem["in_use"] = in_use_now                              # tensors that stay: weights, caches of constants
        mem["used"] = max(mem["init_free"] - free_now, 0)      # all ours now, the runtime's own share included
        mem["non_torch"] = max(mem["used"] - in_use_now, 0)    # runtime workspaces, communicators, allocator slack
        mem["activation_peak"] = max(peak_in_use - in_use_before, 0)
        mem["activation_fresh"] = max(mem.get("peak_fresh", 0) - in_use_before, 0)
        paged = mem.get("peak_paged")
        mem["activation_paged"] = None if paged is None else max(paged - in_use_before, 0)
        mem["peak"] = max(mem["used"] + max(peak_in_use - in_use_now, 0), mem["weights"])
        budget = int(mem["total"] * cfg.gpu_memory_utilization)
        if cfg.kv_cache_memory is not None:
            kv_bytes = cfg.kv_cache_memory
        else:
            if budget > mem["init_free"]:
                if platform.strict_memory_budget:
                    raise ValueError(
                        f"--gpu-memory-utilization {cfg.gpu_memory_utilization} asks for {_gib(budget)} but only "
                        f"{_gib(mem['init_free'])} of {_gib(mem['total'])} was free at start (others use the "
                        f"device); lower it to {mem['init_free'] / mem['total']:.2f} or free the device")
                budget = mem["init_free"]
            kv_bytes = budget - mem["peak"]
            cap = platform.default_kv_cache_cap()
            if cap is not None:
                kv_bytes = min(kv_bytes, cap)
        mem["budget"], mem["kv_bytes"] = budget, kv_bytes
        block_bytes = self.block_bytes()
        num_blocks = max(kv_bytes // block_bytes, 0)
        if cfg.num_gpu_blocks_override is not None:
            num_blocks = cfg.num_gpu_blocks_override
        mem["num_blocks"] = num_blocks
        logger.info("rank %d KV budget: total %s, free at start %s, budget %s (x%.2f); after profiling, ours %s "
                    "(tensors %s incl. weights %s, outside the allocator %s); activation peak %s = the larger of "
                    "%d tokens of fresh prefill (%s) and a paged step at max_model_len %d (%s: decode K/V gathers, "
                    "the chunk's context, full logprobs); peak = ours + activations above what stays = %s "
                    "-> KV cache %s = %d blocks of %d tokens",
                    self.rank, _gib(mem["total"]), _gib(mem["init_free"]), _gib(budget), cfg.gpu_memory_utilization,
                    _gib(mem["used"]), _gib(in_use_now), _gib(mem["weights"]), _gib(mem["non_torch"]),
                    _gib(mem["activation_peak"]), cfg.max_num_batched_tokens, _gib(mem["activation_fresh"]),
                    cfg.max_model_len, "not run on this platform" if paged is None else _gib(mem["activation_paged"]),
                    _gib(mem["peak"]), _gib(kv_bytes), num_blocks, cfg.block_size)
        return num_blocks

    def min_across_ranks(self, value: int) -> int:
        """The smallest of every rank's ``value``, over the host (gloo) group: a scalar needs no device
        communicator, and a device group created here would take memory the KV budget did not count."""
        if self.cpu_group is None:
            return value
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.cpu_group)
        return int(t.item())

    def block_bytes(self) -> int:
        """Bytes of one KV block on this rank: K and V, every local layer."""
        layers = self._attention_layers()
        attn = layers[0]
        per_layer = 2 * self.config.block_size * attn.num_kv_heads * attn.head_dim
        return per_layer * len(layers) * torch.tensor([], dtype=self.config.torch_dtype).element_size()

    def init_kv_cache(self, num_blocks: int) -> None:
        self.platform.empty_cache()
        layers = self._attention_layers()
        backend = self.runner.attn_backend
        self.kv_caches = []
        for attn in layers:
            shape = backend.kv_cache_shape(num_blocks, self.config.block_size, attn.num_kv_heads, attn.head_dim)
            attn.kv_cache = self.platform.kv_cache_tensor(shape, self.config.torch_dtype, self.device)
            self.kv_caches.append(attn.kv_cache)

    def execute_model(self, step: StepInput) -> StepOutput | None:
        return self.runner.execute(step)

    def shutdown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
