"""The flow of the token2wav stage (CausalMaskedDiffWithXvec): speech tokens -> mel, with its strict loader."""
from .cfm import CausalConditionalCFM, cosine_t_schedule, fixed_noise
from .config import CFMConfig, EncoderConfig, EstimatorConfig, FlowConfig
from .encoder import UpsampleConformerEncoder
from .estimator import CausalConditionalDecoder
from .flow import (
    CausalMaskedDiffWithXvec,
    FlowTrace,
    build_flow,
    load_flow,
    load_flow_state,
)

__all__ = [
    "CFMConfig", "CausalConditionalCFM", "CausalConditionalDecoder", "CausalMaskedDiffWithXvec", "EncoderConfig",
    "EstimatorConfig", "FlowConfig", "FlowTrace", "UpsampleConformerEncoder", "build_flow",
    "cosine_t_schedule", "fixed_noise", "load_flow", "load_flow_state",
]
