#!/usr/bin/env python3
"""Extract torch_npu's own declarations of the ops npu_infer calls.

Writes ``tests/npu_standin/declarations.json``, which the CPU stand-in of
torch_npu (``tests/npu_standin``) is checked against in CI.  CI never runs
this script and never downloads the wheel; the JSON is committed.

What is read (the torch_npu wheel cannot be imported without CANN, so it is
read as a zip archive):

* ``torch_npu/csrc/aten/npu_native_functions_by_codegen.yaml`` -- the
  native-function schemas of the aclnn ops (``npu_rms_norm`` ...).
* ``torch_npu/include/third_party/op-plugin/op_plugin/include/AtbOpsInterface.h``
  -- the C++ declarations of the ATB ops (``_npu_paged_attention`` ...).  The
  header has no defaults and no keyword-only marks, so the TorchScript schema
  strings the ATB library registers (``torch.ops.atb.*``) are recovered from
  ``torch_npu/lib/libop_plugin_atb.so``.  The compiler stores those strings as
  16-byte constants that the registration code copies into a buffer, so they
  are rebuilt from ``objdump -d`` output (binutils must be installed) and
  cross-checked, name by name and in order, against the header.  Pass
  ``--no-binary-schemas`` to use the header alone (defaults then unknown).
* ``torch_npu/npu/*.py`` -- the Python ``torch.npu`` namespace (parsed with
  ``ast``): the signatures of the functions npu_infer calls (memory queries,
  ``set_device``, ``set_compile_mode`` ...) and the attribute names
  ``torch.npu.config`` acts on (``allow_internal_format``), each with the
  runtime option it sets.
* ``torch_npu/_op_plugin_docs.py`` -- the operator documentation (parsed with
  ``ast``, never imported); each constraint the stand-in relies on is stored
  as a verbatim sentence, found by an anchor string listed below.  The script
  fails if an anchor is no longer in the docs.
* ``torch_npu/op_plugin/meta/_meta_registrations.py`` -- the ops' meta
  functions (shape/dtype inference for fake tensors), whose checks state some
  rules the documentation leaves out (e.g. a bfloat16 bias needs a bfloat16
  output).  Each is stored as the verbatim source line holding its anchor.

The ATB ops are not documented in the wheel.  For them the constraints are
taken from Ascend's ATB operator pages (URLs recorded with each quote) and
from facts checked in the wheel's binary (e.g. the error string raised for a
non-contiguous output tensor).

Usage::

    python tools/extract_npu_declarations.py            # downloads the wheel
    python tools/extract_npu_declarations.py --wheel path/to/torch_npu.whl
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

DEFAULT_VERSION = "2.14.0"
REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "tests" / "npu_standin" / "declarations.json"

# Ops declared in the native-function yaml (aclnn ops).
YAML_OPS = ["npu_rms_norm", "npu_add_rms_norm", "npu_swiglu", "npu_fused_infer_attention_score",
            "npu_dynamic_quant", "npu_quant_matmul", "npu_weight_quant_batchmatmul", "npu_format_cast",
            "get_npu_format"]
# Ops declared in AtbOpsInterface.h (exposed as torch_npu.<name> = torch.ops.atb.<name>).
ATB_OPS = ["_npu_reshape_and_cache", "_npu_paged_attention", "_npu_rotary_embedding"]

# Functions of the torch.npu namespace (torch_npu/npu/*.py) that npu_infer calls.
NAMESPACE_FUNCS = ["is_available", "device_count", "set_device", "current_device", "synchronize", "empty_cache",
                   "mem_get_info", "memory_allocated", "max_memory_allocated", "reset_peak_memory_stats",
                   "set_compile_mode", "get_device_name", "get_device_properties"]
# Objects of the namespace whose __setattr__ turns attribute names into runtime options (torch.npu.<name>.<attr>).
NAMESPACE_SETTERS = {"config": "_npuConfig"}

# Doc anchors: constraint id -> substring of exactly one sentence (or a few
# sentences; all are kept) of the op's documentation in _op_plugin_docs.py.
DOC_ANCHORS: dict[str, dict[str, str]] = {
    "npu_rms_norm": {
        "dtype": "输入数据类型仅支持float16、bfloat16和float32",
        "self_rank": "self：Tensor类型，支持float16、bfloat16、float32，输入shape支持2-8维",
        "gamma_dtype": "gamma：Tensor类型，数据类型需要和self保持一致",
        "outputs": "第2个输出为Tensor，rms_norm的reverse rms中间结果",
    },
    "npu_swiglu": {
        "signature": "torch_npu.npu_swiglu(Tensor self, int dim=-1)",
        "formula": "outputs = swiglu\\(x, dim = -1) = swish(A) * B",
        "x_dtype": "shape支持1-8维，dtype支持FP32、FP16或BF16类型",
    },
    "npu_fused_infer_attention_score": {
        "query_dtype_contiguous": "query: Tensor类型, attention结构的Query输入, 数据类型支持float16、bfloat16、int8, 不支持非连续的Tensor",
        "key_contiguous": "key: Tensor类型, attention结构的Key输入, 不支持非连续的Tensor",
        "value_contiguous": "value: Tensor类型, attention结构的Value输入, 不支持非连续的Tensor",
        "atten_mask_dtype": "atten_mask: Tensor类型, 对QK的结果进行mask, 用于指示是否计算Token间的相关性, 数据类型支持bool、int8和uint8",
        "atten_mask_sparse_234_shape": "sparse_mode为2、3、4时，shape输入支持(2048,2048)或(1,2048,2048)或(1,1,2048,2048)",
        "actual_seq_lengths_tnd": "当query的input_layout为TND时, 该入参必须传入, 且以该入参元素的数量作为Batch值",
        "actual_seq_lengths_tnd_cumulative": "该入参中每个元素的值表示当前Batch与之前所有Batch的seqlen和, 因此后一个元素的值必须大于等于前一个元素的值, 且不能出现负值",
        "actual_seq_lengths_padding": "限制: 该入参中每个batch的有效seqlen应该不大于query中对应batch的seqlen",
        "actual_seq_lengths_kv_pa_tnd": "在PA场景下, 其长度等于key/value的Batch值, 代表每个Batch的实际长度, 值不大于KV_S",
        "block_table_dtype": "block_table: Tensor类型, 数据类型支持int32",
        "num_heads": "num_heads: 整型, 代表query的head个数",
        "num_key_value_heads": "需要满足num_heads整除num_key_value_heads, num_heads与num_key_value_heads的比值不能大于64",
        "sparse_mode_values": "当前仅支持取值0、1、2、3、4、9, 取值5、6、7、8(分别代表prefix、global、dilated、block_local)暂未实现, 请勿使用",
        "sparse_mode_0": "sparse_mode为0时, 代表defaultMask模式, 如果atten_mask未传入则不做mask操作",
        "sparse_mode_2": "sparse_mode为2时, 代表leftUpCausal模式的mask",
        "sparse_mode_3": "sparse_mode为3时, 代表rightDownCausal模式的mask, 对应以右顶点为划分的下三角场景",
        "sparse_mode_234_mask": "sparse_mode=2、3、4时, atten_mask的shape需要为(S, S)或(1, S, S)或(1, 1, S, S), 其中S的值需要固定为2048",
        "input_layouts_a2": "支持BSH、BSND、BNSD、BNSD_BSND、TND(不支持左padding、tensorlist、pse、page attention、prefix、伪量化、全量化、后量化",
        "tnd_restrictions": "TND场景下query、key、value输入的综合限制",
        "tnd_heads": "N等于8/16/32/64/128, 且Q_N、K_N、V_N相等",
        "tnd_head_dim": "Q_D、K_D等于192, V_D等于128/192",
        "tnd_dtype": "数据类型仅支持BFLOAT16",
        "qs_gt1_limits": "支持N轴小于等于256, 支持D轴小于等于512",
        "qs_gt1_d_align": "输入类型全为float16、bfloat16时, D轴需16对齐",
        "pa_block_size_qs_gt1": "在使能page attention场景下, block_size最小为128, 最大为512, 且要求是128的倍数",
        "pa_block_size_qs_1": "block_size需要传入非0值，且最大不超过512, key、value输入类型为float16、bfloat16时需要16对齐",
        "pa_requires_kv_lengths": "page attention场景下, 必须传入actual_seq_lengths_kv",
        "pa_block_table_2d": "page attention场景下, block_table必须为二维, 第一维长度需等于B, 第二维长度不能小于maxBlockNumPerSeq",
        "pa_kv_layouts": "当query的input_layout为BNSD、TND时, kv cache排布支持(blocknum, blocksize, H)和(blocknum, KV_N, blocksize, D)两种格式, 当query的input_layout为BSH、BSND时, kv cache排布只支持(blocknum, blocksize, H)一种格式",
        "pa_h_limit": "当输入kv cache排布格式为(blocknum, blocksize, H), 且KV_N*D超过65535时",
        "pa_no_int8_query": "不支持输入query为int8的场景",
        "pa_kv_dtypes": "支持key、value数据类型为float16、bfloat16、int8. 在该场景下key、value的input_layout参数无效",
        "kv_same_shape": "参数key、value中对应tensor的shape需要完全一致",
        "outputs": "attention_out: Tensor类型, 公式中的输出, 数据类型支持float16、bfloat16、int8",
        "softmax_lse": "当input_layout为TND时, 输出shape为(T,Q_N,1)的Tensor; softmax_lse_flag为False时, 则输出shape为[1]的值为0的Tensor",
    },
    "npu_dynamic_quant": {
        "formula": "scale=rowMax(abs(x))/DTYPE_MAX",
        "formula_y": "y=round(x/scale)",
        "x_dtype": "x: Tensor类型, 需要进行量化的源数据张量, 必选输入, 数据类型支持torch.float16、torch.bfloat16",
        "x_rank": "输入x的维度必须大于1",
        "dst_type": "传None时当做torch.int8处理",
        "outputs": "数据类型为float32, 形状为x的形状剔除最后一维",
    },
    "npu_quant_matmul": {
        "x1_dtype": "Atlas A2 训练系列产品/Atlas 800I A2 推理产品: 数据类型支持int8和int32",
        "x2_dtype": "Atlas A2 训练系列产品/Atlas 800I A2 推理产品: 数据类型与x1的数据类型保持一致",
        "x_rank": "最小支持输入维度为2维, 最大支持输入维度为6维",
        "scale_shape": "shape需要是1维(t, ), t=1或n, 其中n与x2的n一致",
        "pertoken_scale": "shape需要是1维(m,), 其中m与x1的m一致",
        "bias_shape": "shape支持1维(n,)、2维(1, n)或3维(batch, 1, n)",
        "output_dtype": "Atlas A2 训练系列产品/Atlas 800I A2 推理产品: 支持输入torch.int8、torch.float16、torch.bfloat16、torch.int32",
        "k_n_limit": "其他情况, x1与x2最后一维的shape大小不能超过65535",
        "combo_scale": "scale:int64/float32, int64/float32, float32/bfloat16, float32, int64/float32, float32/bfloat16",
        "combo_bias": "bias:int32/None, int32/None, int32/bfloat16/float32/None, int32/float16/float32/None, int32/None, int32/None",
        "combo_pertoken": "pertoken_scale:None, None, float32/None, float32, None, None",
        "combo_output": "output_dtype:float16, int8, bfloat16, float16, float16, int32",
        "nz_weight": "推荐x2不转置直接转亲和format",
    },
    "npu_weight_quant_batchmatmul": {
        "x_2d": "支持带transpose的非连续的Tensor, 支持输入维度为两维(M, K)",
        "weight_2d": "支持输入维度为两维(K, N), 维度需与x保持一致",
        "weight_a2": "Atlas A2 训练系列产品/Atlas 800I A2 推理产品: 数据类型支持int8、int32(通过int32承载int4的输入",
        "scale_per_channel": "per_channel模式: 输入shape为(1, N)或(N,)",
        "scale_per_tensor": "per_tensor模式: 输入shape为(1,)或(1, 1)",
        "scale_dtype": "若输入为float16、bfloat16,  其数据类型需与x保持一致",
        "offset_dtype": "若输入为float16、bfloat16, 其数据类型需与antiquant_scale保持一致",
        "scale_offset_shape": "antiquant_scale和antiquant_offset的输入shape要保持一致",
        "bias_dtype": "当x数据类型为bfloat16, bias需为float32",
        "bias_dtype_fp16": "当x数据类型为float16, bias需为float16",
        "weight_formats": "数据格式支持ND、FRACTAL_NZ",
        "bias_shape": "不支持非连续的Tensor, 支持输入维度为两维(1, N)或一维(N, )、(1, )",
        "k_n_range": "K、N的范围为[1, 65535]",
        "nz_graph_only": "当输入weight为FRACTAL_NZ格式时暂不支持单算子调用, 只支持图模式调用",
        "output": "当输入不存在quant_scale时输出数据类型和输入x一致",
    },
    "npu_format_cast": {
        "acl_format": "acl_format (Int) - 目标格式",
    },
}

# Meta-function checks: constraint id -> substring of one line of torch_npu/op_plugin/meta/_meta_registrations.py.
META_ANCHORS: dict[str, dict[str, str]] = {
    "npu_quant_matmul": {
        "meta_k_same": "k dim of x1 and x2 need be same",
        "meta_scale_dim": "the scale dim num must be 1",
        "meta_scale_len": "the scale 1st dim value must be 1 or x2 n dim value",
        "meta_pertoken_dim": "the pertoken_scale dim num must be 1",
        "meta_scale_bf16_out": "When scale's dtype is bfloat16, output_dtype must be bfloat16 or int32",
        "meta_bias_bf16_out": "When bias dtype is bfloat16, output_dtype must be bfloat16",
        "meta_bias_fp16_out": "When bias dtype is float16 and pertoken is given, output_dtype must be float16",
        "meta_bias_fp16_pertoken": "Bias dtype cannot be float16 when pertoken not given",
        "meta_int32_out_bias": "When output_dtype dtype is int32, bias_dtype must be int32",
    },
}

# Constraints for ops without documentation in the wheel.  Each quote is a
# sentence of the page at "url" (Chinese original kept verbatim).
EXTERNAL_CONSTRAINTS: dict[str, dict[str, dict[str, str]]] = {
    "_npu_paged_attention": {
        "block_size_head_size": {
            "url": "https://www.hiascend.com/document/detail/zh/canncommercial/80RC2/apiref/ascendtbapi/ascendtb_01_0070.html",
            "quote": "因硬件限制,embedding * blockSize ≤ 128 * 128。 block_size %16 == 0 推荐 block_size = 128,blockTables中元素的值须在[0, num_blocks)之间,head_size 范围(0, 256] 。",
        },
        "shapes": {
            "url": "https://www.hiascend.com/document/detail/zh/mindie/1.0.RC1/mindiert/rtdev/ascendtb_01_0070.html",
            "quote": "query [num_tokens, num_heads, head_size] float16/bf16 ND; keyCache Atlas 800I A2推理产品:[num_blocks, block_size, k_head_num, head_size]",
        },
        "kv_head_num": {
            "url": "https://www.hiascend.com/document/detail/zh/canncommercial/700/foundmodeldev/ascendtb/ascendtb_01_0075.html",
            "quote": "kvHeadNum = 0时,keyCache的k_head_num,valueCache的v_head_num与query的num_heads一致,均为num_heads的数值。 kvHeadNum != 0时,keyCache的k_head_num, valueCache的v_head_num与kvHeadNum值相同。",
        },
        "context_lens_host": {
            "url": "https://www.hiascend.com/document/detail/zh/CANNCommunityEdition/82RC1/API/ascendtbapi/ascendtb_01_0206.html",
            "quote": "blockTables [num_tokens, max_num_blocks_per_query] int32 ND npu; contextLens [batch] int32 ND cpu 每个query对应的key/value的token数量。",
        },
    },
    "_npu_reshape_and_cache": {
        "shapes_dtypes": {
            "url": "https://www.hiascend.com/document/detail/zh/canncommercial/80RC2/apiref/ascendtbapi/ascendtb_01_0073.html",
            "quote": "key [num_tokens, k_num_head, head_size] float16/bfloat16/int8; keyCache [num_blocks, block_size, k_num_head, head_size]; slotMapping [num_tokens] int32 每个token key或value在cache中的存储偏移,即(block_id * block_size + offset_in_block)。",
        },
        "same_dtype": {
            "url": "https://www.hiascend.com/document/detail/zh/canncommercial/80RC2/apiref/ascendtbapi/ascendtb_01_0073.html",
            "quote": "key、value、keyCache、valueCache、keyCacheOut 、valueCacheOut的数据类型都必须完全一致。",
        },
        "in_place": {
            "url": "https://www.hiascend.com/document/detail/zh/canncommercial/80RC2/apiref/ascendtbapi/ascendtb_01_0073.html",
            "quote": "输出keyCache,valueCache与同名输入指向同一地址,即进行原地修改。",
        },
    },
    "_npu_rotary_embedding": {
        "first_cache_wins": {
            "url": "https://github.com/Ascend/op-plugin (op_plugin/ops/atb/RopeOperation: InitializeCosSinCache)",
            "quote": "if (!cosCache.defined() || !sinCache.defined()) { InitializeCosSinCache(cos_sin_cache); }  -- the cos/sin tables are built from the FIRST cos_sin_cache passed in the process and reused for every later call.",
        },
        "neox_tables": {
            "url": "https://github.com/Ascend/op-plugin (op_plugin/ops/atb/RopeOperation: InitializeCosSinCache)",
            "quote": "auto cosSinChunks = cos_sin_cache.chunk(2, -1); cosCacheNeox = cosSinChunks[0].repeat({1, 2}); ropeparam.rotaryCoeff = is_neox_style ? 2 : head_size;",
        },
        "cache_dtype": {
            "url": "https://github.com/vllm-project/vllm-ascend (vllm_ascend/ops/rotary_embedding.py)",
            "quote": "if self.cos_sin_cache.dtype != query.dtype: self.cos_sin_cache = self.cos_sin_cache.to(query.dtype)",
        },
    },
    "npu_quant_matmul": {
        "formula": {
            "url": "https://www.hiascend.com/document/detail/zh/CANNCommunityEdition/82RC1/API/aolapi/context/aclnnQuantMatmulV4.md",
            "quote": "pertoken无bias: out = x1@x2 * scale * pertokenScaleOptional; pertoken, bias INT32(此场景无offset): out = (x1@x2 + bias) * scale * pertokenScaleOptional; pertoken, bias BFLOAT16/FLOAT16/FLOAT32(此场景无offset): out = x1@x2 * scale * pertokenScaleOptional + bias",
        },
    },
    "npu_weight_quant_batchmatmul": {
        "formula": {
            "url": "https://www.hiascend.com/document/detail/zh/canncommercial/82RC1/API/aolapi/context/aclnnWeightQuantBatchMatmulV2.md",
            "quote": "y = x @ ANTIQUANT(weight) + bias; ANTIQUANT(weight) = (weight + antiquantOffset) * antiquantScale",
        },
    },
    "get_npu_format": {
        "no_doc": {
            "url": "",
            "quote": "torch_npu 2.14.0's _op_plugin_docs.py has no entry for get_npu_format; npu_format_cast's example shows it returning the acl format id (0 for a new tensor, 29 after npu_format_cast(x, 29)).",
        },
    },
    "npu_add_rms_norm": {
        "no_doc": {
            "url": "",
            "quote": "torch_npu 2.14.0's _op_plugin_docs.py has no entry for npu_add_rms_norm; the stand-in applies npu_rms_norm's documented dtype rules to x1, x2 and gamma and returns (y, rstd, x1 + x2) as the schema's three outputs.",
        },
    },
}

# Facts checked in the wheel's ATB library (strings / symbols present).
ATB_BINARY_EVIDENCE = {
    "output_must_be_contiguous": (
        b"at_tensor is not contiguous",
        ("ATB ops copy non-contiguous INPUT tensors (ParamSetter::Input calls .contiguous()) but "
         "reject non-contiguous OUTPUT tensors (AtTensor2AtbTensor: TORCH_CHECK(at_tensor.is_contiguous(), "
         "\"at_tensor is not contiguous\")); in-place outputs: key_cache/value_cache, query/key of "
         "_npu_rotary_embedding, out of _npu_paged_attention."),
    ),
    "rotary_first_cache_wins": (
        b"_ZN3atb21InitializeCosSinCacheERKN2at6TensorE",
        ("atb::InitializeCosSinCache is present: _npu_rotary_embedding builds its cos/sin tables once, "
         "from the first cos_sin_cache it sees."),
    ),
}


# --------------------------------------------------------------------------- schema parsing

def _split_top(text: str, sep: str = ",") -> list[str]:
    """Split on `sep` outside brackets/parentheses/quotes."""
    parts, depth, cur, quote = [], 0, [], None
    for ch in text:
        if quote:
            cur.append(ch)
            if ch == quote:
                quote = None
            continue
        if ch in "'\"":
            quote = ch
        elif ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
        if ch == sep and depth == 0:
            parts.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    if "".join(cur).strip():
        parts.append("".join(cur).strip())
    return parts


def _parse_default(text: str):
    t = text.strip()
    if t == "None":
        return None
    if t == "True":
        return True
    if t == "False":
        return False
    if len(t) >= 2 and t[0] == t[-1] and t[0] in "'\"":
        return t[1:-1]
    if t.startswith("[") and t.endswith("]"):
        inner = t[1:-1].strip()
        return [_parse_default(x) for x in _split_top(inner)] if inner else []
    try:
        return int(t)
    except ValueError:
        return float(t)


def parse_schema(schema: str) -> dict:
    """Parse a TorchScript function schema into names, types, defaults, marks."""
    m = re.match(r"^\s*([A-Za-z0-9_]+)(?:\.([A-Za-z0-9_]+))?\((.*)\)\s*->\s*(.+?)\s*$", schema, re.DOTALL)
    if not m:
        raise ValueError(f"cannot parse schema: {schema!r}")
    name, overload, args, ret = m.groups()
    params, kwarg_only = [], False
    for raw in _split_top(args):
        if raw == "*":
            kwarg_only = True
            continue
        if raw.startswith("*"):  # "*,Tensor? x" glued forms are split above; keep robust
            kwarg_only = True
            raw = raw[1:].strip()
        default_text = None
        if "=" in raw:
            raw, default_text = (s.strip() for s in raw.split("=", 1))
        # the type may contain spaces only in "int ?" style (seen in ATB schemas)
        raw = re.sub(r"\s+\?", "?", raw)
        typ, pname = raw.rsplit(None, 1)
        alias = re.search(r"\(([a-z])(!?)\)", typ)
        params.append({
            "name": pname,
            "type": re.sub(r"\([a-z]!?\)", "", typ),
            "optional": typ.endswith("?"),
            "mutable": bool(alias and alias.group(2)),
            "kwarg_only": kwarg_only,
            "has_default": default_text is not None,
            "default": _parse_default(default_text) if default_text is not None else None,
        })
    ret = ret.strip()
    if ret == "()":
        arity = 0
    elif ret.startswith("("):
        arity = len(_split_top(ret[1:-1]))
    else:
        arity = 1
    return {"name": name, "overload": overload, "params": params, "returns": ret, "return_arity": arity}


# --------------------------------------------------------------------------- wheel access

def download_wheel(version: str, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", f"torch-npu=={version}", "-d", str(dest),
           "--only-binary=:all:", "--python-version", "3.11", "--platform", "manylinux_2_28_x86_64"]
    subprocess.run(cmd, check=True)
    wheels = sorted(dest.glob("torch_npu-*.whl"))
    if len(wheels) != 1:
        raise SystemExit(f"expected one wheel in {dest}, found {wheels}")
    return wheels[0]


def find_member(zf: zipfile.ZipFile, suffix: str, prefer_prefix: str = "torch_npu/") -> str:
    hits = [n for n in zf.namelist() if n.endswith(suffix)]
    preferred = [n for n in hits if n.startswith(prefer_prefix)]
    hits = preferred or hits
    if len(hits) != 1:
        raise SystemExit(f"expected exactly one member ending in {suffix!r}, found {hits}")
    return hits[0]


# --------------------------------------------------------------------------- sources

def yaml_schemas(text: str, ops: list[str]) -> dict[str, str]:
    found: dict[str, set[str]] = {op: set() for op in ops}
    for line in text.splitlines():
        m = re.match(r"^\s*-?\s*func:\s*(.+?)\s*$", line)
        if not m:
            continue
        sch = m.group(1)
        head = re.match(r"([A-Za-z0-9_]+)\(", sch)  # base overload only (no ".out")
        if head and head.group(1) in found:
            found[head.group(1)].add(sch)
    out = {}
    for op, schemas in found.items():
        if len(schemas) != 1:
            raise SystemExit(f"{op}: expected one distinct base schema in the yaml, found {sorted(schemas)}")
        out[op] = schemas.pop()
    return out


def header_decls(text: str, ops: list[str]) -> dict[str, list[tuple[str, str]]]:
    out = {}
    for op in ops:
        m = re.search(r"TORCH_NPU_API\s+[^;(]*?\b" + re.escape(op) + r"\(([^;]*)\);", text)
        if not m:
            raise SystemExit(f"{op}: no declaration in AtbOpsInterface.h")
        params = []
        for raw in _split_top(m.group(1)):
            raw = raw.replace("&", " & ").strip()
            name = raw.split()[-1]
            ctype = " ".join(raw.split()[:-1]).replace(" & ", "&").replace(" &", "&")
            params.append((ctype, name))
        out[op] = params
    return out


def binary_schema_strings(so_bytes: bytes, so_path: Path) -> list[str]:
    """Rebuild the schema strings that libop_plugin_atb.so assembles on the stack/heap.

    Registration code copies 16-byte constants (movdqa xmm <- [rip+X]; movups [reg+off] <- xmm)
    and 8/4/2/1-byte immediates into a buffer before calling the schema parser; this replays
    those stores per buffer register and flushes at every call.
    """
    objdump = shutil.which("objdump")
    if objdump is None:
        raise SystemExit("objdump (binutils) is needed to recover ATB schemas; or pass --no-binary-schemas")
    dis = subprocess.run([objdump, "-d", "--no-show-raw-insn", "-M", "intel", str(so_path)],
                         check=True, capture_output=True, text=True).stdout
    sizes = {"QWORD": 8, "DWORD": 4, "WORD": 2, "BYTE": 1, "XMMWORD": 16}
    xmm: dict[str, bytes] = {}
    gp: dict[str, bytes] = {}
    buf: dict[str, dict[int, int]] = {}
    out = []
    for line in dis.splitlines():
        m = re.match(r"\s*[0-9a-f]+:\s+(\w+)\s+(.*)$", line)
        if not m:
            continue
        op, args = m.groups()
        if op in ("movdqa", "movdqu", "movaps", "movups") and args.startswith("xmm"):
            reg = args.split(",")[0]
            addr = re.search(r"# ([0-9a-f]+)", args)
            if addr:
                a = int(addr.group(1), 16)
                xmm[reg] = so_bytes[a:a + 16]
            else:
                xmm.pop(reg, None)
            continue
        if op == "movabs":
            reg, val = args.split(",")
            gp[reg] = int(val, 16).to_bytes(8, "little")
            continue
        st = re.match(r"(\w+) PTR \[(r\w+)\+?(0x[0-9a-f]+)?\],(\S+)", args)
        if op in ("mov", "movups", "movaps", "movdqu") and st:
            size = sizes.get(st.group(1))
            base, off, src = st.group(2), int(st.group(3) or "0", 16), st.group(4)
            if base in ("rsp", "rip", "rbp") or size is None:
                continue
            data = None
            if src.startswith("xmm") and src in xmm:
                data = xmm[src]
            elif src.startswith("0x"):
                data = (int(src, 16) & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
            elif src in gp:
                data = gp[src][:size]
            if data is not None:
                b = buf.setdefault(base, {})
                for i, ch in enumerate(data):
                    b[off + i] = ch
            continue
        if op == "call":
            for b in buf.values():
                if b:
                    n = max(b) + 1
                    raw = bytes(b.get(i, 0) for i in range(n)).split(b"\0")[0]
                    out.append(raw.decode("latin1"))
            buf = {}
    # plus any plain C strings
    out += [s.decode("latin1") for s in re.findall(rb"[ -~]{20,}", so_bytes)]
    return out


def atb_schemas(so_bytes: bytes, so_path: Path, ops: list[str]) -> dict[str, str]:
    strings = binary_schema_strings(so_bytes, so_path)
    out = {}
    for op in ops:
        cands = sorted({s.strip() for s in strings if s.startswith(op + "(") and "->" in s})
        good = []
        for c in cands:
            try:
                parse_schema(c)
                good.append(c)
            except ValueError:
                pass
        if len(good) != 1:
            raise SystemExit(f"{op}: expected one schema string in libop_plugin_atb.so, found {good}")
        out[op] = good[0]
    return out


def _option_dicts(node: ast.AST) -> list[dict]:
    """Literal {key: "enable" if x else "disable"}-style option dicts passed to _npu_setOption in `node`."""
    found = []
    for sub in ast.walk(node):
        if isinstance(sub, ast.Dict):
            keys = [k.value for k in sub.keys if isinstance(k, ast.Constant) and isinstance(k.value, str)]
            values = [sorted({c.value for c in ast.walk(v) if isinstance(c, ast.Constant) and isinstance(c.value, str)})
                      for v in sub.values]
            found.append(dict(zip(keys, values)))
    return found


def namespace_decls(zf: zipfile.ZipFile, funcs: list[str], setters: dict[str, str]) -> dict:
    """Signatures of torch.npu functions and the attributes its setter objects accept, read with ast."""
    init = find_member(zf, "torch_npu/npu/__init__.py")
    members = sorted(n for n in zf.namelist() if re.fullmatch(r"torch_npu/npu/[^/]+\.py", n))
    trees = {m: ast.parse(zf.read(m).decode()) for m in members}
    exported = set()
    for node in trees[init].body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            exported = set(ast.literal_eval(node.value))
    functions = {}
    for name in funcs:
        defs = [(m, node) for m, tree in trees.items() for node in tree.body
                if isinstance(node, ast.FunctionDef) and node.name == name]
        if len(defs) != 1:
            raise SystemExit(f"torch.npu.{name}: expected one module-level definition, found {[m for m, _ in defs]}")
        if name not in exported:
            raise SystemExit(f"torch.npu.{name} is not in torch_npu/npu/__init__.py's __all__")
        member, node = defs[0]
        args = node.args
        positional = args.posonlyargs + args.args
        defaults = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
        params = [{"name": a.arg, "kwarg_only": False, "has_default": d is not None,
                   "default": ast.literal_eval(d) if d is not None else None} for a, d in zip(positional, defaults)]
        params += [{"name": a.arg, "kwarg_only": True, "has_default": d is not None,
                    "default": ast.literal_eval(d) if d is not None else None}
                   for a, d in zip(args.kwonlyargs, args.kw_defaults)]
        if args.vararg or args.kwarg:
            raise SystemExit(f"torch.npu.{name} takes *args/**kwargs; extend the extractor")
        entry = {"python_name": f"torch.npu.{name}", "source": member, "signature": f"{name}({ast.unparse(args)})",
                 "params": params}
        options = _option_dicts(node)
        if options:
            entry["runtime_options"] = options
        functions[name] = entry
    objects = {}
    for attr, cls_name in setters.items():
        assigned = [node for node in trees[init].body if isinstance(node, ast.Assign)
                    and any(isinstance(t, ast.Name) and t.id == attr for t in node.targets)]
        if len(assigned) != 1 or cls_name not in ast.unparse(assigned[0].value):
            raise SystemExit(f"torch.npu.{attr} is not an instance of {cls_name}")
        classes = [(m, node) for m, tree in trees.items() for node in tree.body
                   if isinstance(node, ast.ClassDef) and node.name == cls_name]
        if len(classes) != 1:
            raise SystemExit(f"{cls_name}: expected one definition, found {[m for m, _ in classes]}")
        member, cls = classes[0]
        setattr_fn = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "__setattr__")
        attrs = {}
        for branch in ast.walk(setattr_fn):
            if isinstance(branch, ast.If) and isinstance(branch.test, ast.Compare) \
                    and isinstance(branch.test.comparators[0], ast.Constant):
                attrs[branch.test.comparators[0].value] = {"runtime_options": _option_dicts(ast.Module(branch.body, []))}
        has_getattr = any(isinstance(n, ast.FunctionDef) and n.name == "__getattr__" for n in cls.body)
        objects[attr] = {"python_name": f"torch.npu.{attr}", "class": cls_name, "source": member,
                         "settable_attributes": attrs, "readable": has_getattr,
                         "note": "__setattr__ maps each name to a runtime option and stores nothing; other names "
                                 "are ignored" + ("" if has_getattr else "; reading an attribute raises AttributeError")}
    return {"functions": functions, "objects": objects}


def load_docs(src: str) -> dict[str, str]:
    tree = ast.parse(src)
    docs = {}
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "_add_torch_npu_docstr"
                and len(node.args) == 2 and all(isinstance(a, ast.Constant) for a in node.args)):
            docs[node.args[0].value] = node.args[1].value
    return docs


def sentences(doc: str) -> list[str]:
    out = []
    for line in doc.splitlines():
        line = line.strip()
        if line:
            out += [s.strip() for s in re.split(r"(?<=[.。;；])\s+", line) if s.strip()]
    return out


def doc_constraints(op: str, doc: str | None) -> dict[str, dict]:
    anchors = DOC_ANCHORS.get(op, {})
    if anchors and doc is None:
        raise SystemExit(f"{op}: constraints expected but the op has no documentation")
    out = {}
    sents = sentences(doc) if doc else []
    lines = [ln.strip() for ln in doc.splitlines()] if doc else []
    for cid, anchor in anchors.items():
        hits = [s for s in sents if anchor in s] or [ln for ln in lines if anchor in ln]
        if not hits:
            raise SystemExit(f"{op}: doc anchor {cid!r} not found: {anchor!r}")
        out[cid] = {"source": "torch_npu/_op_plugin_docs.py", "anchor": anchor, "quote": " | ".join(dict.fromkeys(hits))}
    return out


def meta_constraints(op: str, meta_src: str, source: str) -> dict[str, dict]:
    out = {}
    lines = [ln.strip() for ln in meta_src.splitlines()]
    for cid, anchor in META_ANCHORS.get(op, {}).items():
        hits = [ln for ln in lines if anchor in ln]
        if not hits:
            raise SystemExit(f"{op}: meta anchor {cid!r} not found: {anchor!r}")
        out[cid] = {"source": source, "anchor": anchor, "quote": " | ".join(dict.fromkeys(hits))}
    return out


def doc_signature(op: str, doc: str | None) -> str | None:
    if not doc:
        return None
    for line in doc.splitlines():
        if re.search(r"(?:torch_npu\.)?" + re.escape(op) + r"\(", line) and "->" in line:
            return line.strip()
    return None


def compare_doc_signature(parsed: dict, doc_sig: str | None) -> dict:
    """The binding is the yaml schema; record where the documented prototype differs."""
    if not doc_sig:
        return {"doc_signature_matches_schema": None}
    try:
        doc = parse_schema(re.sub(r"^.*?(?=[A-Za-z0-9_]+\()", "", doc_sig.replace("torch_npu.", "")))
    except ValueError:
        return {"doc_signature_matches_schema": None}
    key = lambda p: (p["name"], p["kwarg_only"], p["has_default"], p["default"])
    a, b = [key(p) for p in parsed["params"]], [key(p) for p in doc["params"]]
    types_a = {p["name"]: p["type"] for p in parsed["params"]}
    types_b = {p["name"]: p["type"] for p in doc["params"]}
    out = {"doc_signature_matches_schema": a == b and types_a == types_b}
    if not out["doc_signature_matches_schema"]:
        out["doc_signature_differences"] = {
            "same_names": sorted(types_a) == sorted(types_b),
            "order_differs": [n for n, _, _, _ in a] != [n for n, _, _, _ in b],
            "type_differs": {n: [types_a[n], types_b[n]] for n in types_a
                             if n in types_b and types_a[n] != types_b[n]},
            "differing_params_all_keyword_only": all(
                p["kwarg_only"] for i, p in enumerate(parsed["params"]) if i >= len(b) or key(p) != b[i]),
            "note": "the schema in npu_native_functions_by_codegen.yaml is what the binding accepts",
        }
    return out


# --------------------------------------------------------------------------- main

def build(wheel: Path, use_binary: bool) -> dict:
    zf = zipfile.ZipFile(wheel)
    paths = {
        "yaml": find_member(zf, "csrc/aten/npu_native_functions_by_codegen.yaml"),
        "atb_header": find_member(zf, "op_plugin/include/AtbOpsInterface.h"),
        "docs": find_member(zf, "torch_npu/_op_plugin_docs.py"),
        "atb_library": find_member(zf, "lib/libop_plugin_atb.so"),
        "version": find_member(zf, "torch_npu/version.py"),
        "meta": find_member(zf, "torch_npu/op_plugin/meta/_meta_registrations.py"),
    }
    version_src = zf.read(paths["version"]).decode()
    version = re.search(r"__version__\s*=\s*'([^']+)'", version_src).group(1)
    git_version = re.search(r"git_version\s*=\s*'([^']+)'", version_src)
    yaml_text = zf.read(paths["yaml"]).decode()
    header_text = zf.read(paths["atb_header"]).decode()
    docs = load_docs(zf.read(paths["docs"]).decode())
    so_bytes = zf.read(paths["atb_library"])
    meta_src = zf.read(paths["meta"]).decode()

    evidence = {}
    for key, (needle, meaning) in ATB_BINARY_EVIDENCE.items():
        if needle not in so_bytes:
            raise SystemExit(f"binary evidence {key!r} not found in {paths['atb_library']}")
        evidence[key] = {"source": paths["atb_library"], "found": needle.decode(), "meaning": meaning}

    ops = {}
    for op, schema in yaml_schemas(yaml_text, YAML_OPS).items():
        parsed = parse_schema(schema)
        doc = docs.get(op)
        ops[op] = {
            "kind": "aclnn",
            "python_name": f"torch_npu.{op}",
            "schema": schema,
            "schema_source": paths["yaml"],
            "params": parsed["params"],
            "returns": parsed["returns"],
            "return_arity": parsed["return_arity"],
            "doc_source": paths["docs"] if doc else None,
            "doc_signature": doc_signature(op, doc),
            "constraints": {**doc_constraints(op, doc), **meta_constraints(op, meta_src, paths["meta"])},
        }
        ops[op].update(compare_doc_signature(parsed, ops[op]["doc_signature"]))

    decls = header_decls(header_text, ATB_OPS)
    schemas = atb_schemas(so_bytes, wheel_extract(zf, paths["atb_library"]), ATB_OPS) if use_binary else {}
    for op in ATB_OPS:
        header_names = [n for _, n in decls[op]]
        entry = {
            "kind": "atb",
            "python_name": f"torch_npu.{op}",
            "header_source": paths["atb_header"],
            "header_params": [{"cpp_type": t, "name": n} for t, n in decls[op]],
            "doc_source": None,
        }
        if op in schemas:
            parsed = parse_schema(schemas[op])
            names = [p["name"] for p in parsed["params"]]
            if names != header_names:
                raise SystemExit(f"{op}: binary schema params {names} != header params {header_names}")
            entry.update(schema=schemas[op], schema_source=paths["atb_library"], params=parsed["params"],
                         returns=parsed["returns"], return_arity=parsed["return_arity"])
        else:
            entry.update(schema=None, schema_source=paths["atb_header"], returns="()", return_arity=0, params=[
                {"name": n, "type": t, "optional": "optional" in t, "mutable": not t.startswith("const"),
                 "kwarg_only": False, "has_default": None, "default": None} for t, n in decls[op]])
        entry["constraints"] = {cid: {"source": c["url"], "quote": c["quote"]}
                                for cid, c in EXTERNAL_CONSTRAINTS.get(op, {}).items()}
        ops[op] = entry
    for op, cons in EXTERNAL_CONSTRAINTS.items():
        if op in ops and ops[op]["kind"] == "aclnn":
            for cid, c in cons.items():
                ops[op]["constraints"][cid] = {"source": c["url"], "quote": c["quote"]}

    return {
        "generated_by": "tools/extract_npu_declarations.py",
        "torch_npu_version": version,
        "torch_npu_git_version": git_version.group(1) if git_version else None,
        "wheel": wheel.name,
        "wheel_sha256": hashlib.sha256(wheel.read_bytes()).hexdigest(),
        "sources": paths,
        "binary_evidence": evidence,
        "ops": ops,
        "namespace": namespace_decls(zf, NAMESPACE_FUNCS, NAMESPACE_SETTERS),
    }


_EXTRACT_DIR: list[Path] = []


def wheel_extract(zf: zipfile.ZipFile, member: str) -> Path:
    d = Path(tempfile.mkdtemp(prefix="npu_decl_"))
    _EXTRACT_DIR.append(d)
    return Path(zf.extract(member, d))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wheel", type=Path, help="an already downloaded torch_npu wheel")
    ap.add_argument("--version", default=DEFAULT_VERSION)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--no-binary-schemas", action="store_true",
                    help="do not disassemble libop_plugin_atb.so; ATB defaults/keyword-only marks stay unknown")
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="torch_npu_wheel_"))
    try:
        wheel = args.wheel or download_wheel(args.version, tmp)
        data = build(wheel, use_binary=not args.no_binary_schemas)
        if args.wheel is None and data["torch_npu_version"] != args.version:
            raise SystemExit(f"downloaded {data['torch_npu_version']}, asked for {args.version}")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(data, indent=1, ensure_ascii=False, sort_keys=False) + "\n", encoding="utf-8")
        print(f"wrote {args.out} ({len(data['ops'])} ops, torch_npu {data['torch_npu_version']})")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        for d in _EXTRACT_DIR:
            shutil.rmtree(d, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
