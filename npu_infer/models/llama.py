"""Llama (and, with QKV bias, Qwen2): the textbook decoder forward over TP-shaped layers, PP-split by stage."""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from npu_infer import envs
from npu_infer.distributed.parallel_state import get_pp_group
from npu_infer.models.layers.activation import SiluAndMul
from npu_infer.models.layers.attention import Attention
from npu_infer.models.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from npu_infer.models.layers.layernorm import RMSNorm
from npu_infer.models.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from npu_infer.models.layers.rotary import RotaryEmbedding
from npu_infer.platform import current_platform
from npu_infer.platform.torch_ops import RopeStep
from npu_infer.worker.context import get_context


def pp_layer_range(num_layers: int, pp_rank: int, pp_size: int) -> tuple[int, int]:
    """Layers [start, end) of one pipeline stage: even split, or NPU_INFER_PP_LAYER_PARTITION like '12,12'."""
    spec = envs.NPU_INFER_PP_LAYER_PARTITION
    if spec:
        sizes = [int(x) for x in spec.split(",")]
        if len(sizes) != pp_size or sum(sizes) != num_layers or min(sizes) < 1:
            raise ValueError(f"NPU_INFER_PP_LAYER_PARTITION={spec!r} must give {pp_size} positive layer counts "
                             f"summing to {num_layers}")
    else:
        if num_layers < pp_size:
            raise ValueError(f"{num_layers} layers cannot be split over {pp_size} pipeline stages")
        base, extra = divmod(num_layers, pp_size)
        sizes = [base + (1 if i >= pp_size - extra else 0) for i in range(pp_size)]  # later stages take the rest
    start = sum(sizes[:pp_rank])
    return start, start + sizes[pp_rank]


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rotary_embedding(config) -> RotaryEmbedding:
    """The model's one rotary table, from the checkpoint's rope parameters."""
    rope_params = getattr(config, "rope_parameters", None) or {}
    scaling = getattr(config, "rope_scaling", None) or rope_params or None
    theta = rope_params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    return RotaryEmbedding(head_dim_of(config), config.max_position_embeddings, theta, scaling)


class LlamaAttention(nn.Module):
    def __init__(self, config, qkv_bias: bool):
        super().__init__()
        hidden = config.hidden_size
        num_heads = config.num_attention_heads
        num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
        head_dim = head_dim_of(config)
        self.qkv_proj = QKVParallelLinear(hidden, head_dim, num_heads, num_kv_heads, bias=qkv_bias)
        self.o_proj = RowParallelLinear(num_heads * head_dim, hidden, bias=getattr(config, "o_bias", False))
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.q_size, self.kv_size = self.num_heads * head_dim, self.num_kv_heads * head_dim
        self.ops = current_platform().fused_ops()
        self.attn = Attention(self.num_heads, head_dim, head_dim ** -0.5, self.num_kv_heads)

    def forward(self, rope: RopeStep, hidden: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_proj(hidden).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.ops.rotary(q, k, rope)
        return self.o_proj(self.attn(q, k, v))


class LlamaMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [config.intermediate_size] * 2)
        self.down_proj = RowParallelLinear(config.intermediate_size, config.hidden_size)
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config, qkv_bias: bool):
        super().__init__()
        self.self_attn = LlamaAttention(config, qkv_bias)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, rope, hidden, residual):
        if residual is None:
            hidden, residual = self.input_layernorm(hidden), hidden
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(rope, hidden)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    # Set by the platform after loading when it runs whole decode steps natively (CPU: cpu_decode_stack.py).
    platform_decode = None

    def __init__(self, config, qkv_bias: bool):
        super().__init__()
        pp = get_pp_group()
        self.start_layer, self.end_layer = pp_layer_range(config.num_hidden_layers, pp.rank_in_group, pp.world_size)
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size) if pp.is_first_rank else None
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, qkv_bias) if self.start_layer <= i < self.end_layer else nn.Identity()
            for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps) if pp.is_last_rank else None
        self.rotary_emb = rotary_embedding(config)  # one table for all layers

    def forward(self, input_ids, positions, hidden=None, residual=None):
        if hidden is None:
            hidden = self.embed_tokens(input_ids)
        fused = self.platform_decode
        if fused is not None and residual is None and fused.accepts(hidden, meta := get_context()):
            hidden, residual = fused(hidden, positions, meta)
        else:
            rope = self.rotary_emb(positions, hidden.dtype)  # once per step: every layer rotates at these positions
            for layer in self.layers[self.start_layer:self.end_layer]:
                hidden, residual = layer(rope, hidden, residual)
        if self.norm is None:
            return hidden, residual  # handed to the next pipeline stage
        hidden, _ = self.norm(hidden, residual)
        return hidden, None


class LlamaForCausalLM(nn.Module):
    qkv_bias = False
    # checkpoint name piece -> (our merged module, shard id)
    packed_modules = {"q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
                      "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, self.qkv_bias)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size) if get_pp_group().is_last_rank else None
        if self.tie_word_embeddings and self.lm_head is not None and self.model.embed_tokens is not None:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids, positions, hidden=None, residual=None):
        return self.model(input_ids, positions, hidden, residual)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head.compute_logits(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load HF-named tensors into this rank's (sharded, merged) parameters; unknown or missing names fail."""
        params = dict(self.named_parameters(remove_duplicate=False))
        loaded: set[str] = set()
        unknown = []
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name:
                continue
            if not self.owns_weight(name):
                continue
            if name == "lm_head.weight" and self.tie_word_embeddings:
                if self.model.embed_tokens is not None:
                    continue  # tied: the embedding provides it
                name = "lm_head.weight"
            target, shard_id = name, None
            for piece, (merged, sid) in self.packed_modules.items():
                if f".{piece}." in name:
                    target, shard_id = name.replace(f".{piece}.", f".{merged}."), sid
                    break
            if target not in params and name == "model.embed_tokens.weight" and self.tie_word_embeddings:
                target = "lm_head.weight"  # last PP stage without the embedding takes the tied weight
            param = params.get(target)
            if param is None:
                unknown.append(name)
                continue
            loader = getattr(param, "weight_loader", None)
            if loader is None:
                if param.shape != tensor.shape:
                    raise ValueError(f"{name}: shape {tuple(tensor.shape)} does not match {tuple(param.shape)}")
                param.data.copy_(tensor)
            elif shard_id is None:
                loader(param, tensor)
            else:
                loader(param, tensor, shard_id)
            loaded.add(f"{target}#{shard_id}")
        if unknown:
            raise ValueError(f"checkpoint has tensors this model does not know: {', '.join(unknown[:5])}"
                             + (f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else ""))
        missing = [n for n in self.expected_weight_keys() if n not in loaded]
        if missing:
            raise ValueError(f"checkpoint lacks tensors: {', '.join(missing[:5])}"
                             + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""))

    def expected_weight_keys(self) -> list[str]:
        """Every (parameter, shard) this rank must receive, in the same form load_weights records."""
        shards_of = {"qkv_proj": ["q", "k", "v"], "gate_up_proj": [0, 1]}
        keys = []
        for name, _ in self.named_parameters():
            merged = next((m for m in shards_of if f".{m}." in name), None)
            # weight_scale: int8 checkpoints; weight_min: GGUF Q4; deq_scale ... input_offset: static W8A8 (msmodelslim)
            if merged and name.endswith((".weight", ".bias", ".weight_scale", ".weight_min", ".deq_scale",
                                         ".quant_bias", ".input_scale", ".input_offset")):
                keys += [f"{name}#{sid}" for sid in shards_of[merged]]
            elif name == "lm_head.weight" and self.tie_word_embeddings and self.model.embed_tokens is not None:
                continue
            else:
                keys.append(f"{name}#None")
        return keys

    def owns_weight(self, name: str) -> bool:
        """Whether this rank's stage holds the checkpoint tensor `name` (loaders skip the others unread)."""
        if name.startswith("model.layers."):
            index = int(name.split(".")[2])
            return self.model.start_layer <= index < self.model.end_layer
        if name.startswith("model.embed_tokens"):
            return self.model.embed_tokens is not None or (self.tie_word_embeddings and self.lm_head is not None)
        if name.startswith("model.norm"):
            return self.model.norm is not None
        if name.startswith("lm_head"):
            return self.lm_head is not None
        return True


class Qwen2ForCausalLM(LlamaForCausalLM):
    qkv_bias = True
