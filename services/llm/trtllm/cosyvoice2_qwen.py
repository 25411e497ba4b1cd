"""TensorRT-LLM model class for the CosyVoice2 export: Qwen2 with a biased lm_head.

Loaded by `trtllm-build --model_cls_file <this file> --model_cls_name CosyVoice2QWenForCausalLM` (TensorRT-LLM's own
option for customised models; see build_engine.sh). Imports tensorrt_llm at module level, so it is only ever
imported by trtllm-build on a TensorRT-LLM machine, never by our packages or tests.

Why: TensorRT-LLM's QWenForCausalLM builds `lm_head` with bias=False, so the export's `lm_head.bias` (llm_decoder's
bias on the speech rows, -inf on every text/special/padding row; spec 8.5) would be dropped with only a
"provided but not required" warning: text ids would get logit 0 and could be sampled, and the speech logits would
lose their bias. This subclass is the stock model with the same head shape and sharding (vocab rows split over
tensor-parallel ranks, gathered) plus the bias; `cosyvoice_llm.trtllm.headbias` writes `lm_head.bias` into the
converted checkpoint's rank files.
"""
from tensorrt_llm._utils import pad_vocab_size
from tensorrt_llm.layers import ColumnLinear
from tensorrt_llm.models.qwen.model import QWenForCausalLM


class CosyVoice2QWenForCausalLM(QWenForCausalLM):

    def __init__(self, config):
        super().__init__(config)
        if config.mapping.is_last_pp_rank():
            self.lm_head = ColumnLinear(config.hidden_size,
                                        pad_vocab_size(config.vocab_size, config.mapping.tp_size),
                                        bias=True,
                                        dtype=config.dtype,
                                        tp_group=config.mapping.tp_group,
                                        tp_size=config.mapping.tp_size,
                                        gather_output=True)
