"""npu_infer: an LLM inference engine and OpenAI-compatible server for Ascend NPUs, CUDA and CPU."""
from npu_infer.llm import LLM
from npu_infer.outputs import CompletionOutput, Logprob, RequestOutput
from npu_infer.sampling import RequestOutputKind, SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "RequestOutputKind", "RequestOutput", "CompletionOutput", "Logprob", "__version__"]
