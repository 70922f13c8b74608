"""Helpers of the end-to-end tests on the stand-in: greedy parity with near-tie tolerance, kernel and batch spies,
and simulated device memory for the KV sizing."""

from __future__ import annotations

from dataclasses import dataclass, field

# Tolerances for comparing two bf16 runs of one model that differ only in their kernels (measured on the tiny
# models and SmolLM2: CPU-bf16 and NPU-stand-in-bf16 are each within 0.1-0.2 nats of an fp32 run, median 0.01-0.02).
# The logits come out of the LM head in bf16, whose resolution is 0.125 for |logit| in [16, 32): a logprob
# difference of two rounding steps is noise, not a bug.  A bug (mask, rotary position, cache slot, GQA head
# mapping) shifts most logprobs by tenths of a nat or more, so besides the per-token bound the median difference
# must stay small, and the runs must agree outright on most tokens.
LOGPROB_TOL = 0.25
MEDIAN_TOL = 0.05


def first_divergence(ref, got, diffs: list[float], tol: float = LOGPROB_TOL) -> int:
    """Index of the first token where two greedy completions differ (len if none); asserts they are consistent.

    While the tokens agree, the sampled token's logprob must agree within `tol` (each difference is appended
    to `diffs`).  Where they first differ, each run's choice must be a near-tie in the other run: both tokens
    among the other's top candidates, within `tol` of its best; after that the continuations are unrelated
    and are not compared.  Both completions need SamplingParams(logprobs>=2)."""
    a, b = ref.outputs[0], got.outputs[0]
    for i, (ta, tb) in enumerate(zip(a.token_ids, b.token_ids)):
        la, lb = a.logprobs[i], b.logprobs[i]
        if ta == tb:
            diff = abs(la[ta].logprob - lb[tb].logprob)
            assert diff <= tol, f"request {ref.request_id} token {i} ({ta}): logprobs differ by {diff:.3f}"
            diffs.append(diff)
            continue
        assert tb in la and ta in lb, (f"request {ref.request_id} token {i}: {ta} vs {tb}, and neither run ranks "
                                       "the other's choice among its top candidates")
        gap_a, gap_b = la[ta].logprob - la[tb].logprob, lb[tb].logprob - lb[ta].logprob
        assert gap_a <= tol and gap_b <= tol, (f"request {ref.request_id} token {i}: {ta} vs {tb} is not a "
                                               f"near-tie (gaps {gap_a:.3f}, {gap_b:.3f})")
        return i
    assert len(a.token_ids) == len(b.token_ids)
    return len(a.token_ids)


def compare_greedy(refs, gots, min_agreement: float) -> tuple[int, int]:
    """first_divergence over request pairs, then the median and agreement bounds; returns (agreed, total)."""
    diffs: list[float] = []
    agreed = total = 0
    for ref, got in zip(refs, gots, strict=True):
        agreed += first_divergence(ref, got, diffs)
        total += len(ref.outputs[0].token_ids)
    diffs.sort()
    median = diffs[len(diffs) // 2]
    assert median <= MEDIAN_TOL, f"median logprob difference {median:.3f} over {len(diffs)} agreeing tokens"
    assert agreed >= min_agreement * total, f"only {agreed} of {total} tokens before the first near-tie"
    return agreed, total


@dataclass
class Spy:
    """Counts the stand-in kernel calls and records the shape of every attention step."""
    kernels: dict[str, int] = field(default_factory=dict)
    steps: list[tuple] = field(default_factory=list)  # (num_decodes, query_lens, seq_lens, with_cache)

    @property
    def mixed_steps(self) -> list[tuple]:
        """Steps holding decodes and prefills together."""
        return [s for s in self.steps if s[3] and 0 < s[0] < len(s[1])]

    @property
    def chunked_prefill_steps(self) -> list[tuple]:
        """Steps with a multi-token prefill whose context is partly in the cache already."""
        return [s for s in self.steps if s[3] and any(q > 1 and k > q for q, k in zip(s[1][s[0]:], s[2][s[0]:]))]


def install_spy(npu, monkeypatch) -> Spy:
    from npu_infer.platform.npu_attention import NpuAttentionImpl
    spy = Spy()
    for name in ("npu_rms_norm", "npu_add_rms_norm", "npu_swiglu", "npu_fused_infer_attention_score",
                 "_npu_reshape_and_cache", "_npu_paged_attention", "_npu_rotary_embedding"):
        def counted(*args, _fn=getattr(npu, name), _name=name, **kwargs):
            spy.kernels[_name] = spy.kernels.get(_name, 0) + 1
            return _fn(*args, **kwargs)
        monkeypatch.setattr(npu, name, counted)
    forward = NpuAttentionImpl.forward
    seen: list = [None]

    def recording_forward(self, q, k, v, kv_cache, meta):
        if meta is not seen[0]:  # once per step, not once per layer
            seen[0] = meta
            spy.steps.append((meta.num_decodes, list(meta.query_lens_cpu), list(meta.seq_lens_cpu),
                              kv_cache.numel() > 0))
        return forward(self, q, k, v, kv_cache, meta)
    monkeypatch.setattr(NpuAttentionImpl, "forward", recording_forward)
    return spy


def simulate_memory(monkeypatch, *, weights: int, activation: int, non_torch: int) -> None:
    """Make the stand-in's torch.npu report what a real device would during start-up.

    After load: `weights` allocated.  During profile_run: the allocator peaks `activation` above that, and
    `non_torch` bytes (runtime workspaces, HCCL buffers) leave the free memory without showing in the allocator."""
    from npu_infer.worker.worker import Worker

    from . import _namespace, set_memory
    load, profile = Worker.load_model, Worker.profile_run

    def load_model(self):
        load(self)
        free = _namespace.state["free"]
        set_memory(allocated=weights, peak=weights, free=free - weights)

    def profile_run(self):
        profile(self)
        set_memory(peak=weights + activation, free=_namespace.state["free"] - non_torch)
    monkeypatch.setattr(Worker, "load_model", load_model)
    monkeypatch.setattr(Worker, "profile_run", profile_run)
