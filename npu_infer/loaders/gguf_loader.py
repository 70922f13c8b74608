"""GGUF checkpoint loading (``--load-format gguf``).

A GGUF file (llama.cpp's format) holds three things we need:

* model hyper-parameters as ``{arch}.*`` metadata -> :func:`load_gguf_config`
* the tokenizer (vocab, merges, special ids, chat template) as
  ``tokenizer.*`` metadata -> :func:`load_gguf_tokenizer`
* (possibly quantized) tensors under llama.cpp names -> :func:`iterate_gguf_weights`
  yields them dequantized, under Hugging Face names and in HF layout.

Supported architectures: ``llama`` (Llama, Mistral, SmolLM, ...) and
``qwen2``.  Supported tensor types: see
:data:`npu_infer.loaders.gguf_dequant.SUPPORTED_TYPES`.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from collections.abc import Callable, Collection, Iterator
from typing import Any

import torch

from npu_infer.loaders.gguf_dequant import Q4_TYPES, SUPPORTED_TYPES, dequantize, split_q4, split_q8_0

logger = logging.getLogger(__name__)

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "gguf_tensor_name_to_hf",
    "is_gguf_file",
    "iterate_gguf_weights",
    "load_gguf_config",
    "load_gguf_tokenizer",
    "tensor_types",
]

GGUF_MAGIC = b"GGUF"

# gguf architecture -> (HF model_type, HF architectures entry)
SUPPORTED_ARCHITECTURES: dict[str, tuple[str, str]] = {
    "llama": ("llama", "LlamaForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
}

# llama.cpp's converter permutes the rows of q/k projections for these
# architectures (to turn HF's "rotate half" RoPE into interleaved pairs).
_PERMUTED_QK_ARCHS = frozenset({"llama"})

_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}

_BLOCK_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}

_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([A-Za-z0-9_]+)\.(weight|bias)$")

# llama.cpp-only tensors with no HF counterpart; skipped quietly(ish).
_IGNORED_TENSORS = frozenset({"rope_freqs.weight"})


# --------------------------------------------------------------------------- #
# file access
# --------------------------------------------------------------------------- #
def is_gguf_file(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is a readable regular file starting with ``b"GGUF"``."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except (OSError, TypeError, ValueError):
        return False


def _invalid(path: str, why: str) -> ValueError:
    return ValueError(f"{path} is not a valid GGUF file: {why}")


@functools.lru_cache(maxsize=2)
def _cached_reader(path: str, size: int, mtime_ns: int):
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path, "r")
    except Exception as e:  # noqa: BLE001 - the reader raises IndexError/ValueError/KeyError/...
        raise _invalid(
            path, f"cannot parse it, it is probably truncated or corrupt ({type(e).__name__}: {e})"
        ) from None
    for t in reader.tensors:
        end = int(t.data_offset) + int(t.n_bytes)
        if end > size:
            raise _invalid(
                path, f"tensor {t.name!r} ends at byte {end} but the file has only {size} bytes (truncated?)"
            )
    return reader


def _open_reader(path: str | os.PathLike[str]):
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file not found: {path}")
    if not is_gguf_file(path):
        with open(path, "rb") as f:
            head = f.read(4)
        raise _invalid(path, f"it starts with {head!r}, not the GGUF magic {GGUF_MAGIC!r}")
    st = os.stat(path)
    real = os.path.realpath(path)
    return _cached_reader(real, st.st_size, st.st_mtime_ns)


def _field(reader, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return default
    v = f.contents()
    if hasattr(v, "item"):  # numpy scalar
        v = v.item()
    return v


def _architecture(reader, path: str) -> str:
    arch = _field(reader, "general.architecture")
    if arch is None:
        raise _invalid(path, "it has no 'general.architecture' metadata")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"GGUF architecture {arch!r} of {path} is not supported; supported architectures: "
            + ", ".join(SUPPORTED_ARCHITECTURES)
            + "."
        )
    return arch


# --------------------------------------------------------------------------- #
# config
# --------------------------------------------------------------------------- #
def _required(reader, key: str, path: str) -> Any:
    v = _field(reader, key)
    if v is None:
        raise _invalid(path, f"required metadata key {key!r} is missing")
    return v


def _config_dict(reader, path: str) -> dict[str, Any]:
    arch = _architecture(reader, path)
    model_type, hf_arch = SUPPORTED_ARCHITECTURES[arch]

    def a(key: str, default: Any = None) -> Any:
        return _field(reader, f"{arch}.{key}", default)

    hidden = int(_required(reader, f"{arch}.embedding_length", path))
    n_layers = int(_required(reader, f"{arch}.block_count", path))
    n_heads = int(_required(reader, f"{arch}.attention.head_count", path))
    n_kv = a("attention.head_count_kv", n_heads)
    if isinstance(n_kv, list):  # per-layer array
        if len(set(n_kv)) != 1:
            raise ValueError(f"{path}: per-layer KV head counts {sorted(set(n_kv))} are not supported.")
        n_kv = n_kv[0]
    n_kv = int(n_kv)
    ffn = int(_required(reader, f"{arch}.feed_forward_length", path))

    names = {t.name: t for t in reader.tensors}
    vocab = a("vocab_size")
    if vocab is None and "token_embd.weight" in names:
        vocab = int(names["token_embd.weight"].shape[1])  # ne = [hidden, vocab]
    if vocab is None:
        tokens = reader.fields.get("tokenizer.ggml.tokens")
        vocab = len(tokens.data) if tokens is not None else None
    if vocab is None:
        raise _invalid(path, "cannot determine the vocabulary size")

    rope_theta = float(a("rope.freq_base", 10000.0))
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": rope_theta}
    scaling = a("rope.scaling.type")
    if scaling not in (None, "none"):
        factor = a("rope.scaling.factor")
        if scaling not in ("linear", "yarn") or factor is None:
            raise ValueError(f"{path}: RoPE scaling {scaling!r} (factor {factor}) is not supported.")
        rope = {"rope_type": scaling, "rope_theta": rope_theta, "factor": float(factor)}
        orig = a("rope.scaling.original_context_length")
        if orig is not None:
            rope["original_max_position_embeddings"] = int(orig)
    if "rope_freqs.weight" in names:
        logger.warning(
            "%s has a 'rope_freqs.weight' tensor (llama3-style RoPE frequency factors); it is "
            "ignored, plain RoPE with theta=%s is used.",
            path,
            rope_theta,
        )

    cfg: dict[str, Any] = {
        "model_type": model_type,
        "architectures": [hf_arch],
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": ffn,
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "max_position_embeddings": int(a("context_length", 2048)),
        "rms_norm_eps": float(a("attention.layer_norm_rms_epsilon", 1e-6 if arch == "qwen2" else 1e-5)),
        "rope_parameters": rope,
        "tie_word_embeddings": "output.weight" not in names,
        "hidden_act": "silu",
    }
    if arch == "llama":
        head_dim = a("attention.key_length") or a("rope.dimension_count") or hidden // n_heads
        cfg["head_dim"] = int(head_dim)
        cfg["attention_bias"] = "blk.0.attn_q.bias" in names
        cfg["mlp_bias"] = "blk.0.ffn_up.bias" in names
    for gguf_key, hf_key in (("bos", "bos"), ("eos", "eos"), ("padding", "pad")):
        tid = _field(reader, f"tokenizer.ggml.{gguf_key}_token_id")
        if tid is not None:
            cfg[f"{hf_key}_token_id"] = int(tid)
    _check_sizes(cfg, path)
    return cfg


# Upper bounds on header values that size allocations (the rotary table, embeddings, layers): far above any real
# model, far below what would exhaust memory before a check could say what is wrong.
_SIZE_LIMITS = {"hidden_size": 2**17, "intermediate_size": 2**20, "num_hidden_layers": 2**12,
                "num_attention_heads": 2**12, "num_key_value_heads": 2**12, "vocab_size": 2**23,
                "max_position_embeddings": 2**22, "head_dim": 2**12}


def _check_sizes(cfg: dict[str, Any], path: str) -> None:
    for key, limit in _SIZE_LIMITS.items():
        value = cfg.get(key)
        if value is not None and not 1 <= value <= limit:
            raise _invalid(path, f"{key} = {value} is out of range [1, {limit}]")
    if cfg["num_key_value_heads"] > cfg["num_attention_heads"]:
        raise _invalid(path, f"{cfg['num_key_value_heads']} KV heads exceed {cfg['num_attention_heads']} "
                             "attention heads")


def load_gguf_config(path: str | os.PathLike[str]):
    """Build a ``transformers`` config (LlamaConfig / Qwen2Config) from GGUF metadata.

    Raises ``ValueError`` for an unsupported architecture or an invalid file.
    """
    from transformers import LlamaConfig, Qwen2Config

    path = os.fspath(path)
    cfg = _config_dict(_open_reader(path), path)
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[cfg.pop("model_type")]
    return cls(**cfg)


# --------------------------------------------------------------------------- #
# tokenizer
# --------------------------------------------------------------------------- #
def load_gguf_tokenizer(path: str | os.PathLike[str]):
    """A ``transformers`` fast tokenizer built from the GGUF ``tokenizer.*`` metadata
    (vocab, merges, special tokens) with the file's chat template set."""
    from transformers import AutoTokenizer

    path = os.fspath(path)
    reader = _open_reader(path)  # validates the file first: clear errors
    directory, name = os.path.split(os.path.abspath(path))
    try:
        tok = AutoTokenizer.from_pretrained(directory, gguf_file=name, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - any failure here means unusable tokenizer metadata
        raise ValueError(
            f"cannot build a tokenizer from the GGUF metadata of {path}: {type(e).__name__}: {e}"
        ) from None
    template = _field(reader, "tokenizer.chat_template")
    if template and not getattr(tok, "chat_template", None):
        tok.chat_template = template
    return tok


# --------------------------------------------------------------------------- #
# weights
# --------------------------------------------------------------------------- #
def gguf_tensor_name_to_hf(name: str) -> str | None:
    """HF parameter name for a llama.cpp tensor name (llama/qwen2), or None if unknown."""
    if name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[name]
    m = _BLOCK_RE.match(name)
    if m and m.group(2) in _BLOCK_TENSORS:
        return f"model.layers.{m.group(1)}.{_BLOCK_TENSORS[m.group(2)]}.{m.group(3)}"
    return None


def tensor_types(path: str | os.PathLike[str]) -> dict[str, str]:
    """HF name -> GGML type name (``Q8_0``, ``Q4_1``, ``F32``, ...) of every model tensor of a GGUF file."""
    path = os.fspath(path)
    reader = _open_reader(path)
    _architecture(reader, path)
    names = ((gguf_tensor_name_to_hf(t.name), t.tensor_type.name) for t in reader.tensors)
    return {hf: kind for hf, kind in names if hf is not None}


def stored_q8_0(path: str | os.PathLike[str], hf_name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The Q8_0 tensor of a GGUF file that provides `hf_name` as stored (:func:`split_q8_0`), or None where it is of
    another type. ``lm_head.weight`` is ``output.weight``, else the tied ``token_embd.weight``."""
    reader = _open_reader(os.fspath(path))
    by_name = {gguf_tensor_name_to_hf(t.name): t for t in reader.tensors}
    t = by_name.get(hf_name)
    if t is None and hf_name == "lm_head.weight":
        t = by_name.get("model.embed_tokens.weight")
    if t is None or t.tensor_type.name != "Q8_0":
        return None
    return split_q8_0(t.data, tuple(int(d) for d in reversed(t.shape.tolist())))


def _unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's ``permute`` of q/k rows (``convert_hf_to_gguf.py``):
    GGUF rows per head are (dim, 2)-interleaved; HF rows are (2, dim)."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape).contiguous()


def iterate_gguf_weights(
    path: str | os.PathLike[str],
    *,
    dtype: torch.dtype = torch.float32,
    show_progress: bool = True,
    owns: Callable[[str], bool] | None = None,
    int8: Collection[str] = (),
    int4: Collection[str] = (),
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf_name, tensor)`` for every model tensor of a GGUF file (with ``owns``, only those whose HF name
    it accepts: a pipeline stage's own, so no rank dequantizes the other stages' layers).

    ``int8``: HF names of Q8_0 weights ``X.weight`` to yield as stored, not dequantized: ``X.weight`` int8 [N, K]
    and ``X.weight_scale`` float32 [N, K / 32] (:func:`split_q8_0`; gguf_as_stored.py decides which).
    ``int4``: likewise Q4_0 / Q4_1 weights: ``X.weight`` uint8 [N, K] (0..15), ``X.weight_scale`` and
    ``X.weight_min`` float32 [N, K / 32] (:func:`split_q4`).

    Tensors are dequantized to float32 (then cast to ``dtype``), reshaped to
    the HF layout (GGUF lists dimensions innermost-first, so the HF shape is
    the GGUF shape reversed) and, for the llama architecture, the q/k
    projection rows are un-permuted.  ``lm_head.weight`` is only yielded when
    the file has an ``output.weight`` (otherwise the embeddings are tied).

    Raises ``ValueError`` (before yielding anything) for an invalid/truncated
    file, an unsupported architecture or an unsupported tensor type.
    """
    from tqdm.auto import tqdm

    path = os.fspath(path)
    reader = _open_reader(path)
    cfg = _config_dict(reader, path)
    permute = cfg["model_type"] in _PERMUTED_QK_ARCHS
    n_heads, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]

    plan = []
    for t in reader.tensors:
        hf_name = gguf_tensor_name_to_hf(t.name)
        if hf_name is None:
            if t.name not in _IGNORED_TENSORS:
                logger.warning("Skipping GGUF tensor %r of %s: no HF counterpart known.", t.name, path)
            continue
        if t.tensor_type not in SUPPORTED_TYPES:
            raise ValueError(
                f"GGUF tensor {t.name!r} of {path} has type {t.tensor_type.name}, which is not supported; "
                "supported types: " + ", ".join(q.name for q in SUPPORTED_TYPES) + "."
            )
        if owns is None or owns(hf_name):  # every type checked above, only this rank's tensors dequantized
            plan.append((t, hf_name))

    def unpermuted(w: torch.Tensor, hf_name: str) -> torch.Tensor:
        if permute and ".self_attn.q_proj." in hf_name:
            return _unpermute_qk(w, n_heads)
        if permute and ".self_attn.k_proj." in hf_name:
            return _unpermute_qk(w, n_kv)
        return w

    for t, hf_name in tqdm(plan, desc="Loading GGUF tensors", unit="tensor", disable=not show_progress):
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        if hf_name in int8:
            if t.tensor_type.name != "Q8_0":
                raise ValueError(f"GGUF tensor {t.name!r} of {path} is {t.tensor_type.name}, not Q8_0")
            q, d = split_q8_0(t.data, shape)
            yield hf_name, unpermuted(q, hf_name)  # q and k rows are permuted with their block scales
            yield f"{hf_name.removesuffix('.weight')}.weight_scale", unpermuted(d, hf_name)
            continue
        if hf_name in int4:
            if t.tensor_type not in Q4_TYPES:
                raise ValueError(f"GGUF tensor {t.name!r} of {path} is {t.tensor_type.name}, not Q4_0 or Q4_1")
            q, d, m = split_q4(t.data, t.tensor_type, shape)
            stem = hf_name.removesuffix(".weight")
            yield hf_name, unpermuted(q, hf_name)  # q and k rows are permuted with their block scales and mins
            yield f"{stem}.weight_scale", unpermuted(d, hf_name)
            yield f"{stem}.weight_min", unpermuted(m, hf_name)
            continue
        w = unpermuted(dequantize(t.data, t.tensor_type, shape), hf_name)
        if dtype != torch.float32:
            w = w.to(dtype)
        yield hf_name, w
