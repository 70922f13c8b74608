"""`npu-infer selftest [--device npu|cuda|cpu]`: the first command to run on a new machine.

Each fused op and attention path on the device against a plain-torch reference on the host (bf16 tolerances),
the sampler with every parameter, a tiny random Llama and Qwen2 end to end against the CPU backend, then the
KV budget the engine would use.  Prints a pass/fail table with timings and a hint for each known failure;
exits 1 if anything failed."""
from __future__ import annotations

import argparse
import gc
import logging
import math
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from npu_infer.platform import Platform, init_platform
from npu_infer.platform.npu_attention import LAYOUT_ENV
from npu_infer.platform.torch_ops import TorchOps
from npu_infer.sampling import SamplerRow, SamplingParams, sample
from npu_infer.worker.model_runner import ModelRunner
from npu_infer.worker.step_io import SeqChunk

BF16_TOL = dict(atol=3e-2, rtol=3e-2)  # two bf16 roundings of values of order one
NEAR_TIE = 0.25  # nats: two greedy runs may pick either of two tokens this close (see tests/npu_standin/_e2e.py)
NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 8, 2, 128  # GQA, and the head_dim every NPU kernel and layout takes
# The tiny models' rotary table, also used by the rotary check: torch_npu's rotary kernel keeps the first cos/sin
# table of the process, so every rotary call here must use one table.
ROPE_THETA, MAX_POSITIONS = 10000.0, 1024

# (substring of the error, what to do); the first match is shown under a failed check.
HINTS = [
    ("libatb", "the _npu_* ops need NNAL's ATB library: install NNAL and `source /usr/local/Ascend/nnal/atb/set_env.sh`"),
    ("nnal", "install NNAL (ATB) and `source /usr/local/Ascend/nnal/atb/set_env.sh`"),
    ("561002", f"this CANN rejects the TND paged prefill: run with {LAYOUT_ENV}=BSH"),
    (LAYOUT_ENV, f"this CANN rejects the TND paged prefill: run with {LAYOUT_ENV}=BSH"),
    ("undefined symbol", "torch_npu does not match this CANN or torch: install the torch-npu release built for both"),
    ("libascend", "CANN's libraries are not found: `source /usr/local/Ascend/ascend-toolkit/set_env.sh`"),
    ("needs torch_npu", "install CANN, source its set_env.sh, and `pip install npu_infer[npu]` (torch-npu X.Y.Z needs "
                  "torch==X.Y.Z)"),
]


@dataclass
class Check:
    name: str
    ok: bool
    seconds: float
    detail: str

    @property
    def hint(self) -> str:
        text = self.detail.lower()
        return next((hint for needle, hint in HINTS if needle.lower() in text), "") if not self.ok else ""


def _close(got: torch.Tensor, want: torch.Tensor, what: str) -> str:
    """Compare a device result with its host reference; returns the largest difference, raises if too far."""
    got = got.cpu().double()
    torch.testing.assert_close(got, want.double(), **BF16_TOL, msg=lambda m: f"{what}: {m}")
    return f"max |diff| {float((got - want.double()).abs().max()):.3g}"


# ---------------------------------------------------------------- fused ops

def _neox_rotary(x: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
    cos, sin = cos_sin[positions].float().chunk(2, dim=-1)
    x = x.float().view(x.shape[0], -1, HEAD_DIM)
    a, b = x.chunk(2, dim=-1)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1).flatten(1)


def check_ops(platform: Platform, device: torch.device, dtype: torch.dtype) -> list[tuple[str, str]]:
    ops = platform.fused_ops()
    g = torch.Generator().manual_seed(0)
    x, res = torch.randn(37, 512, generator=g), torch.randn(37, 512, generator=g)
    w = 1 + 0.1 * torch.randn(512, generator=g)
    on = lambda t: t.to(device=device, dtype=dtype, copy=True)  # noqa: E731  (ops may work in place)
    rms = lambda t: F.rms_norm(t.float(), (t.shape[-1],), eps=1e-6) * w  # noqa: E731
    results = [("rms_norm", _close(ops.rms_norm(on(x), on(w), 1e-6), rms(x.to(dtype)), "rms_norm"))]
    y, new_res = ops.add_rms_norm(on(x), on(res), on(w), 1e-6)
    summed = x.to(dtype).float() + res.to(dtype).float()
    results.append(("add_rms_norm", _close(y, rms(summed), "add_rms_norm") + "; "
                    + _close(new_res, summed, "add_rms_norm residual")))
    gate_up = torch.randn(37, 2 * 256, generator=g)
    a, b = gate_up.to(dtype).float().chunk(2, dim=-1)
    results.append(("swiglu", _close(ops.silu_and_mul(on(gate_up)), F.silu(a) * b, "swiglu")))
    positions = torch.randint(0, 400, (37,), generator=g)
    inv = 1.0 / (ROPE_THETA ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float) / HEAD_DIM))
    freqs = torch.outer(torch.arange(MAX_POSITIONS, dtype=torch.float), inv)
    cos_sin = torch.cat((freqs.cos(), freqs.sin()), dim=-1)
    qkv = torch.randn(37, (NUM_HEADS + 2 * NUM_KV_HEADS) * HEAD_DIM, generator=g).to(dtype)
    q, k, _ = qkv.split([NUM_HEADS * HEAD_DIM, NUM_KV_HEADS * HEAD_DIM, NUM_KV_HEADS * HEAD_DIM], dim=-1)
    dq, dk, _ = on(qkv).split([NUM_HEADS * HEAD_DIM, NUM_KV_HEADS * HEAD_DIM, NUM_KV_HEADS * HEAD_DIM], dim=-1)
    rope = ops.rope_step(positions.to(device), cos_sin.to(device), HEAD_DIM, dtype)  # float32 table, as the model
    rq, rk = ops.rotary(dq, dk, rope)
    results.append(("rotary", _close(rq, _neox_rotary(q, positions, cos_sin), "rotary q") + "; "
                    + _close(rk, _neox_rotary(k, positions, cos_sin), "rotary k")))
    return results


# ---------------------------------------------------------------- attention

def _reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, first: int, scale: float) -> torch.Tensor:
    """q [n, H*D] for positions first..first+n-1 of a sequence whose keys/values are k, v [first+n, KV*D]."""
    n, total = q.shape[0], k.shape[0]
    q = q.float().view(n, NUM_HEADS, HEAD_DIM).transpose(0, 1)
    rep = NUM_HEADS // NUM_KV_HEADS
    k = k.float().view(total, NUM_KV_HEADS, HEAD_DIM).repeat_interleave(rep, dim=1).transpose(0, 1)
    v = v.float().view(total, NUM_KV_HEADS, HEAD_DIM).repeat_interleave(rep, dim=1).transpose(0, 1)
    mask = torch.arange(total)[None, :] <= (first + torch.arange(n))[:, None]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return out.transpose(0, 1).reshape(n, NUM_HEADS * HEAD_DIM)


def _step(runner: ModelRunner, backend, impl, kv_cache, parts, dtype, device):
    """One attention step over (k_all, v_all, q_all, start, stop, block_ids) per sequence; returns output and meta."""
    chunks = [SeqChunk(str(i), [0] * (stop - start), start, blocks, False)
              for i, (_, _, _, start, stop, blocks) in enumerate(parts)]
    _, _, meta = runner.prepare(chunks, [blocks for *_, blocks in parts])
    pick = lambda idx: torch.cat([p[idx][p[3]:p[4]] for p in parts]).to(dtype).to(device)  # noqa: E731
    q, k, v = pick(2), pick(0), pick(1)
    out = impl.forward(q, k, v, kv_cache, backend.build_metadata(meta))
    return out, meta


def check_attention(platform: Platform, device: torch.device, dtype: torch.dtype, layout: str | None) -> str:
    """Cache write, paged decode and paged (chunked) prefill of one mixed step against the host reference."""
    backend = platform.attention_backend(HEAD_DIM, dtype)
    if layout is not None:
        backend.prefill_layout = layout
    impl = backend.make_impl(NUM_HEADS, HEAD_DIM, HEAD_DIM ** -0.5, NUM_KV_HEADS)
    bs = platform.default_block_size()
    g = torch.Generator().manual_seed(1)
    lens = [(bs + 3, 1), (9, 1), (bs + 20, 40), (0, 25)]  # (cached, new): 2 decodes, chunked prefill, fresh prefill
    num_blocks = sum(-(-(c + n) // bs) for c, n in lens) + 1
    kv_cache = torch.zeros(backend.kv_cache_shape(num_blocks, bs, NUM_KV_HEADS, HEAD_DIM), dtype=dtype, device=device)
    runner = ModelRunner(None, device, bs, NUM_HEADS * HEAD_DIM, dtype)
    seqs, next_block = [], 1
    for cached, new in lens:
        total = cached + new
        blocks = list(range(next_block, next_block + -(-total // bs)))
        next_block += len(blocks)
        kv = [torch.randn(total, NUM_KV_HEADS * HEAD_DIM, generator=g).to(dtype) for _ in range(2)]
        seqs.append((kv[0], kv[1], torch.randn(total, NUM_HEADS * HEAD_DIM, generator=g).to(dtype), cached, total, blocks))
    # Step 1 writes the cached prefixes (a prefill over an empty cache); step 2 is the mixed step under test.
    first = [(k, v, q, 0, c, b) for k, v, q, c, _, b in seqs if c]
    _step(runner, backend, impl, kv_cache, first, dtype, device)
    seqs.sort(key=lambda s: s[4] - s[3] != 1)
    out, meta = _step(runner, backend, impl, kv_cache, seqs, dtype, device)
    want = torch.cat([_reference_attention(q[c:t], k, v, c, HEAD_DIM ** -0.5) for k, v, q, c, t, _ in seqs])
    detail = _close(out, want, "attention output")
    cache = kv_cache[0].cpu()
    if cache.shape[0] == NUM_KV_HEADS and cache.shape[1] == num_blocks:  # (heads, blocks, block_size, dim)
        cache = cache.permute(1, 2, 0, 3)
    new_k = torch.cat([k[c:t] for k, _, _, c, t, _ in seqs])
    written = cache.reshape(-1, NUM_KV_HEADS * HEAD_DIM)[meta.slot_mapping.cpu()]
    torch.testing.assert_close(written, new_k, atol=0, rtol=0, msg=lambda m: f"cache write: {m}")
    detail += "; cache write exact"
    return detail


# ---------------------------------------------------------------- sampler

def check_sampler(device: torch.device) -> str:
    """Every parameter on the device: greedy rows and logprobs as on the host, sampled tokens inside the set the
    host allows (top-k, top-p, min-p after penalties), the same seed giving the same tokens again."""
    vocab = 300
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(6, vocab, generator=g) * 3
    params = [SamplingParams(temperature=0.0, logprobs=3),
              SamplingParams(temperature=0.0, repetition_penalty=1.5, presence_penalty=1.0, frequency_penalty=0.5),
              SamplingParams(temperature=0.9, top_k=5, seed=1),
              SamplingParams(temperature=1.0, top_p=0.5, seed=2, logprobs=1),
              SamplingParams(temperature=0.7, min_p=0.3, seed=3),
              SamplingParams(temperature=1.2, top_k=20, top_p=0.9, min_p=0.05, repetition_penalty=1.2, seed=4)]

    def rows(dev):
        return [SamplerRow(p, torch.Generator(device=dev).manual_seed(p.seed) if p.seed is not None else None,
                           [1, 2, 3], [7, 7, 8]) for p in params]
    host = sample(logits, rows(torch.device("cpu")))
    got = sample(logits.to(device), rows(device))
    again = sample(logits.to(device), rows(device))
    if got.token_ids[:2] != host.token_ids[:2]:
        raise AssertionError(f"greedy rows: device {got.token_ids[:2]}, host {host.token_ids[:2]}")
    if got.token_ids != again.token_ids:
        raise AssertionError(f"the same seeds gave {got.token_ids} then {again.token_ids}")
    for i in (0, 3):
        if got.logprobs[i][2] != host.logprobs[i][2] or not math.isclose(got.logprobs[i][0], host.logprobs[i][0],
                                                                         abs_tol=1e-3):
            raise AssertionError(f"row {i} logprobs: device {got.logprobs[i]}, host {host.logprobs[i]}")
    allowed = _allowed_tokens(logits, params)
    for i in range(2, len(params)):
        if got.token_ids[i] not in allowed[i]:
            raise AssertionError(f"row {i} ({params[i]}) sampled {got.token_ids[i]}, outside {sorted(allowed[i])}")
    return f"tokens {got.token_ids}"


def _allowed_tokens(logits: torch.Tensor, params: list[SamplingParams]) -> list[set[int]]:
    """Per row, the tokens top-k / top-p / min-p leave, computed plainly on the host (penalties first)."""
    out = []
    for row, p in zip(logits, params):
        row = row.double().clone()
        if p.has_penalties:
            for t in {1, 2, 3, 7, 8}:
                row[t] = row[t] / p.repetition_penalty if row[t] > 0 else row[t] * p.repetition_penalty
            for t, n in ((7, 2), (8, 1)):
                row[t] -= p.frequency_penalty * n + p.presence_penalty
        probs = (row / max(p.temperature, 1e-5)).softmax(-1)
        order = probs.argsort(descending=True).tolist()
        keep = order[:p.top_k] if p.top_k else order
        kept = probs[keep] / probs[keep].sum()
        cumulative, allowed = 0.0, set()
        for t, pr in zip(keep, kept.tolist()):
            if cumulative >= p.top_p + 1e-6:
                break
            cumulative += pr
            if pr >= p.min_p * kept[0].item() - 1e-9:
                allowed.add(t)
        out.append(allowed)
    return out


# ---------------------------------------------------------------- end to end

def _tiny_checkpoint(directory: Path, arch: str) -> Path:
    """A random transformers checkpoint whose attention shapes every backend takes (head_dim 128, GQA 4:1)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    shape = dict(vocab_size=512, hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=MAX_POSITIONS, rms_norm_eps=1e-6,
                 rope_theta=ROPE_THETA)
    config_cls, model_cls = (LlamaConfig, LlamaForCausalLM) if arch == "llama" else (Qwen2Config, Qwen2ForCausalLM)
    model = model_cls(config_cls(**shape))
    with torch.no_grad():  # larger than the default init, so next-token distributions are peaked
        for name, param in model.named_parameters():
            if "norm" not in name:
                param.normal_(0, 0.1)
    model.save_pretrained(directory / arch)
    return directory / arch


def _greedy(model_dir: Path, device: str, **engine) -> tuple[list, dict]:
    from npu_infer import LLM
    llm = LLM(str(model_dir), device=device, dtype="bfloat16", max_model_len=512, max_num_batched_tokens=128, max_num_seqs=8,
              skip_tokenizer_init=True, **engine)
    g = torch.Generator().manual_seed(3)
    prompts = [{"prompt_token_ids": torch.randint(3, 512, (n,), generator=g).tolist()} for n in (200, 37, 5)]
    try:
        outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=16, logprobs=5, ignore_eos=True))
        return [o.outputs[0] for o in outs], dict(llm.engine.memory)
    finally:
        llm.engine.shutdown()
        del llm
        gc.collect()


def check_end_to_end(device: str, model_dir: Path) -> str:
    want, _ = _greedy(model_dir, "cpu", kv_cache_memory="64MiB")
    got, _ = _greedy(model_dir, device, kv_cache_memory="64MiB")
    agreed = total = 0
    for ref, out in zip(want, got):
        total += len(ref.token_ids)
        for i, (a, b) in enumerate(zip(ref.token_ids, out.token_ids)):
            if a != b:  # allowed only where both runs see a near-tie; the rest is not compared
                gap = max(ref.logprobs[i][a].logprob - ref.logprobs[i].get(b, _NEG).logprob,
                          out.logprobs[i][b].logprob - out.logprobs[i].get(a, _NEG).logprob)
                if gap > NEAR_TIE:
                    raise AssertionError(f"token {i}: {device} chose {b}, the CPU backend {a} (gap {gap:.2f} nats)")
                break
            agreed += 1
    # A run that diverged at near-ties right away compared too little to prove anything. A quarter, not a half: on
    # an AVX2-only CPU (the plain-torch bf16 reference) the tiny qwen2's flat distributions tied within 0.03-0.06
    # nats after 0, 3 and 9 tokens of its three prompts (12 of 48 compared), with no token off by more.
    if agreed < total // 4:
        raise AssertionError(f"only {agreed} of {total} greedy tokens agree with the CPU backend")
    return f"{agreed}/{total} greedy tokens as on the CPU backend"


class _Missing:
    logprob = -math.inf


_NEG = _Missing()


def check_kv_budget(device: str, directory: Path) -> str:
    _, memory = _greedy(directory / "qwen2", device)
    return (f"{memory['num_blocks']} blocks ({memory['kv_bytes'] / 2**30:.2f} GiB) of {memory['total'] / 2**30:.1f} "
            f"GiB; peak {memory['peak'] / 2**30:.2f} GiB (see the KV budget log line)")


# ---------------------------------------------------------------- driver

def run(device: str, models: bool = True) -> list[Check]:
    checks: list[Check] = []

    def attempt(name: str, fn) -> None:
        start = time.perf_counter()
        try:
            detail, ok = fn() or "", True
        except Exception as exc:  # a failed check is a row of the table, not the end of the self-test
            detail, ok = f"{type(exc).__name__}: {exc}".strip(), False
            logging.getLogger(__name__).debug("%s failed:\n%s", name, traceback.format_exc())
        checks.append(Check(name, ok, time.perf_counter() - start, detail))

    try:
        platform = init_platform(device)
    except Exception as exc:
        return [Check("platform", False, 0.0, f"{type(exc).__name__}: {exc}")]
    dev = platform.device(0)
    platform.set_device(dev)
    dtype = torch.bfloat16
    op_results: dict[str, str] = {}

    def ops():
        op_results.update(check_ops(platform, dev, dtype))
        return ", ".join(op_results)
    with torch.inference_mode():
        attempt("fused ops", ops)
        layouts = ["TND", "BSH"] if platform.device_type == "npu" else [None]
        for layout in layouts:
            attempt(f"attention{' ' + layout if layout else ''} (cache write, decode, chunked prefill)",
                    lambda layout=layout: check_attention(platform, dev, dtype, layout))
        attempt("sampler (every parameter)", lambda: check_sampler(dev))
    if not models:
        return checks
    with tempfile.TemporaryDirectory(prefix="npu-infer-selftest-") as tmp:
        for arch in ("llama", "qwen2"):
            _tiny_checkpoint(Path(tmp), arch)
        # First, while the device holds nothing else of ours: the budget a server started now would get.
        attempt("KV budget", lambda: check_kv_budget(device, Path(tmp)))
        for arch in ("llama", "qwen2"):
            attempt(f"tiny {arch} end to end", lambda arch=arch: check_end_to_end(device, Path(tmp) / arch))
    return checks


def print_table(checks: list[Check], device: str) -> None:
    width = max(len(c.name) for c in checks)
    print(f"npu-infer selftest --device {device}")
    for c in checks:
        print(f"  {'PASS' if c.ok else 'FAIL'}  {c.name:{width}s}  {c.seconds:7.2f}s  {c.detail[:300]}")
        if c.hint:
            print(f"        hint: {c.hint}")
    failed = sum(not c.ok for c in checks)
    print(f"{len(checks) - failed} passed, {failed} failed")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="npu-infer selftest", description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["npu", "cuda", "cpu"], default="npu")
    parser.add_argument("--skip-models", action="store_true", help="only the kernels and the sampler (seconds)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    checks = run(args.device, models=not args.skip_models)
    print_table(checks, args.device)
    return 0 if all(c.ok for c in checks) else 1
