"""Names that cross a process boundary: Triton model names, tensor names and types, exported metric names.

Callers name a tensor by its stage's namespace (`Token2WavIn.CACHE_MEL`, `LLMOut.OUTPUT_IDS`), a plain `str`;
the `*_INPUTS` / `*_OUTPUTS` tuples give each tensor's type and shape and are what the gateway's stage client
checks calls against. The stage registry (`cosyvoice_common.stages`) attaches model and tuples to each stage.
Shapes exclude Triton's batch dimension where the model config has max_batch_size > 0.
"""
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class TensorSpec:
    name: str
    datatype: str   # Triton datatype string: FP32, INT32, BOOL, BYTES, UINT64
    dims: tuple[int, ...]
    optional: bool = False
    # An optional input that changes the result (token2wav's `speed`): the gateway refuses a call that carries it
    # to a replica whose model does not declare it, rather than leaving it out as it does for hints.
    honoured_or_refused: bool = False


# --- tokenizer stage: 16 kHz prompt -> speech codes (+SPEECH_ID_OFFSET, as the seed's audio_tokenizer) ---
TOKENIZER_MODEL = "audio_tokenizer"


class TokenizerIn:
    REFERENCE_WAV = "reference_wav"              # 16 kHz mono, may be zero-padded
    REFERENCE_WAV_LEN = "reference_wav_len"


class TokenizerOut:
    PROMPT_SPEECH_TOKENS = "prompt_speech_tokens"


TOKENIZER_INPUTS = (
    TensorSpec(TokenizerIn.REFERENCE_WAV, "FP32", (-1,)),
    TensorSpec(TokenizerIn.REFERENCE_WAV_LEN, "INT32", (1,)),
)
TOKENIZER_OUTPUTS = (TensorSpec(TokenizerOut.PROMPT_SPEECH_TOKENS, "INT32", (-1,)),)

# --- speaker stage: 16 kHz prompt -> x-vector; 24 kHz prompt -> prompt mel -------------------------
SPEAKER_MODEL = "speaker_embedding"


class SpeakerIn:
    REFERENCE_WAV = "reference_wav"              # 16 kHz mono
    REFERENCE_WAV_LEN = "reference_wav_len"
    REFERENCE_WAV_24K = "reference_wav_24k"      # 24 kHz mono (for the prompt mel)
    REFERENCE_WAV_24K_LEN = "reference_wav_24k_len"


class SpeakerOut:
    PROMPT_SPK_EMBEDDING = "prompt_spk_embedding"
    PROMPT_SPEECH_FEAT = "prompt_speech_feat"    # 50 Hz log-mel frames (empty when no 24 kHz input)


SPEAKER_INPUTS = (
    TensorSpec(SpeakerIn.REFERENCE_WAV, "FP32", (-1,)),
    TensorSpec(SpeakerIn.REFERENCE_WAV_LEN, "INT32", (1,)),
    TensorSpec(SpeakerIn.REFERENCE_WAV_24K, "FP32", (-1,), optional=True),
    TensorSpec(SpeakerIn.REFERENCE_WAV_24K_LEN, "INT32", (1,), optional=True),
)
SPEAKER_OUTPUTS = (
    TensorSpec(SpeakerOut.PROMPT_SPK_EMBEDDING, "FP32", (192,)),
    TensorSpec(SpeakerOut.PROMPT_SPEECH_FEAT, "FP32", (-1, 80)),
)

# --- llm stage: the TensorRT-LLM backend's tensor contract (decoupled, streaming) --------------------
LLM_MODEL = "llm"


class LLMIn:
    INPUT_IDS = "input_ids"                      # flat vocabulary (see constants)
    INPUT_LENGTHS = "input_lengths"
    REQUEST_OUTPUT_LEN = "request_output_len"    # max new tokens
    END_ID = "end_id"
    PAD_ID = "pad_id"
    STREAMING = "streaming"
    MIN_LENGTH = "min_length"                    # min new tokens (eos masked before)
    RUNTIME_TOP_K = "runtime_top_k"
    RUNTIME_TOP_P = "runtime_top_p"
    TEMPERATURE = "temperature"
    RANDOM_SEED = "random_seed"
    STREAM_BOUNDARIES = "stream_boundaries"      # ours: see LLM_STREAM_BOUNDARIES


class LLMOut:
    OUTPUT_IDS = "output_ids"                    # [beam=1, new tokens in this response]
    SEQUENCE_LENGTH = "sequence_length"


# Ours, not TensorRT-LLM's (which rejects unknown inputs): the gateway's stage client sends it only to a replica whose
# served `llm` model config lists it. Cumulative generated-token counts at which a streaming response is sent; tokens
# in between are held back (services/llm/README.md).
LLM_STREAM_BOUNDARIES = TensorSpec(LLMIn.STREAM_BOUNDARIES, "INT32", (-1,), optional=True)
LLM_INPUTS = (
    TensorSpec(LLMIn.INPUT_IDS, "INT32", (-1,)),
    TensorSpec(LLMIn.INPUT_LENGTHS, "INT32", (1,)),
    TensorSpec(LLMIn.REQUEST_OUTPUT_LEN, "INT32", (1,)),
    TensorSpec(LLMIn.END_ID, "INT32", (1,), optional=True),
    TensorSpec(LLMIn.PAD_ID, "INT32", (1,), optional=True),
    TensorSpec(LLMIn.STREAMING, "BOOL", (1,), optional=True),
    TensorSpec(LLMIn.MIN_LENGTH, "INT32", (1,), optional=True),
    TensorSpec(LLMIn.RUNTIME_TOP_K, "INT32", (1,), optional=True),
    TensorSpec(LLMIn.RUNTIME_TOP_P, "FP32", (1,), optional=True),
    TensorSpec(LLMIn.TEMPERATURE, "FP32", (1,), optional=True),
    TensorSpec(LLMIn.RANDOM_SEED, "UINT64", (1,), optional=True),
    LLM_STREAM_BOUNDARIES,
)
LLM_OUTPUTS = (
    TensorSpec(LLMOut.OUTPUT_IDS, "INT32", (-1, -1)),
    TensorSpec(LLMOut.SEQUENCE_LENGTH, "INT32", (-1,)),
)
# A parameter of the served llm model's config (services/llm/model_repository/llm/config.pbtxt): positions per
# request (prompt + generated), which the gateway reads to fit a request's text into the stage.
LLM_CAPACITY_PARAMETER = "max_seq_len"

# --- token2wav stage: stateless chunk calls; the vocoder overlap cache travels with the request ------
TOKEN2WAV_MODEL = "token2wav"


class Token2WavIn:
    TARGET_SPEECH_TOKENS = "target_speech_tokens"   # flat ids (code + SPEECH_ID_OFFSET), whole prefix
    PROMPT_SPEECH_TOKENS = "prompt_speech_tokens"   # flat ids
    PROMPT_SPEECH_FEAT = "prompt_speech_feat"
    PROMPT_SPK_EMBEDDING = "prompt_spk_embedding"
    TOKEN_OFFSET = "token_offset"                   # absent = offline (one pass)
    FINALIZE = "finalize"
    CACHE_MEL = "cache_mel"                         # previous chunk's last 8 mel frames
    CACHE_SOURCE = "cache_source"                   # previous chunk's last 3840 source samples
    CACHE_SPEECH = "cache_speech"                   # previous chunk's withheld 3840 samples
    # The request's seed for the vocoder's source noise; the stage mixes it with token_offset per chunk
    # (`cosyvoice_token2wav.sequence.chunk_seed`). Absent = the process RNG (not reproducible).
    SEED = "seed"
    SPEED = "speed"                                 # see TOKEN2WAV_SPEED
    PREFILL = "prefill"                             # see TOKEN2WAV_PREFILL


class Token2WavOut:
    WAVEFORM = "waveform"                           # 24 kHz
    CACHE_MEL = "cache_mel"                         # empty on finalize
    CACHE_SOURCE = "cache_source"
    CACHE_SPEECH = "cache_speech"


# The overlap cache a streaming chunk returns and the next chunk sends back, under the same names.
TOKEN2WAV_CACHE = (Token2WavOut.CACHE_MEL, Token2WavOut.CACHE_SOURCE, Token2WavOut.CACHE_SPEECH)
# Offline calls only (no token_offset): the final mel is stretched linearly in time to int(frames / speed) before
# the vocoder, as the reference's `speed`. Absent = 1.0. The gateway sends it only when it is not 1.
TOKEN2WAV_SPEED = TensorSpec(Token2WavIn.SPEED, "FP32", (1,), optional=True, honoured_or_refused=True)
# A prompt only (target_speech_tokens empty): the stage computes the prompt's complete blocks into its state cache
# and answers an empty waveform, so the stream's first chunk computes little more than its own frames. The gateway
# sends it while the LLM decodes, to the replica that will serve the stream.
TOKEN2WAV_PREFILL = TensorSpec(Token2WavIn.PREFILL, "BOOL", (1,), optional=True, honoured_or_refused=True)
TOKEN2WAV_INPUTS = (
    TensorSpec(Token2WavIn.TARGET_SPEECH_TOKENS, "INT32", (-1,)),
    TensorSpec(Token2WavIn.PROMPT_SPEECH_TOKENS, "INT32", (-1,)),
    TensorSpec(Token2WavIn.PROMPT_SPEECH_FEAT, "FP32", (-1, 80)),
    TensorSpec(Token2WavIn.PROMPT_SPK_EMBEDDING, "FP32", (192,)),
    TensorSpec(Token2WavIn.TOKEN_OFFSET, "INT32", (1,), optional=True),
    TensorSpec(Token2WavIn.FINALIZE, "BOOL", (1,), optional=True),
    TensorSpec(Token2WavIn.CACHE_MEL, "FP32", (80, -1), optional=True),
    TensorSpec(Token2WavIn.CACHE_SOURCE, "FP32", (-1,), optional=True),
    TensorSpec(Token2WavIn.CACHE_SPEECH, "FP32", (-1,), optional=True),
    TensorSpec(Token2WavIn.SEED, "UINT64", (1,), optional=True),
    TOKEN2WAV_SPEED,
    TOKEN2WAV_PREFILL,
)
TOKEN2WAV_OUTPUTS = (
    TensorSpec(Token2WavOut.WAVEFORM, "FP32", (-1,)),
    TensorSpec(Token2WavOut.CACHE_MEL, "FP32", (80, -1)),
    TensorSpec(Token2WavOut.CACHE_SOURCE, "FP32", (-1,)),
    TensorSpec(Token2WavOut.CACHE_SPEECH, "FP32", (-1,)),
)


# --- the seed recipe's model `cosyvoice2` (the gateway's seed fronts): what its clients send and read ---------
SEED_MODEL = "cosyvoice2"                       # the only name the seed's clients accept for CosyVoice2


class SeedIn:
    REFERENCE_WAV = "reference_wav"              # [1, N] 16 kHz, zero-padded to whole seconds by the seed's client
    REFERENCE_WAV_LEN = "reference_wav_len"
    REFERENCE_TEXT = "reference_text"            # BYTES
    TARGET_TEXT = "target_text"                  # BYTES
    MIN_SPEECH_TOKENS = "min_speech_tokens"      # ours, optional: exact lengths (benchmarks)
    MAX_SPEECH_TOKENS = "max_speech_tokens"


class SeedOut:
    WAVEFORM = "waveform"                        # 24 kHz


SEED_TEXT_INPUTS = (SeedIn.REFERENCE_TEXT, SeedIn.TARGET_TEXT)
SEED_INPUTS = (SeedIn.REFERENCE_WAV, SeedIn.REFERENCE_WAV_LEN, *SEED_TEXT_INPUTS, SeedIn.MIN_SPEECH_TOKENS,
               SeedIn.MAX_SPEECH_TOKENS)


# --- metrics: exported by one process, read by Prometheus, the profiler (cosyvoice_tools.profile) and tests ------
class GatewayMetric:
    """The gateway's Prometheus metrics (its HTTP /metrics, or METRICS_PORT)."""
    STAGE_SECONDS = "cosyvoice_gateway_stage_seconds"              # histogram {stage, part=queue|compute}
    REQUESTS = "cosyvoice_gateway_requests_total"                  # {rpc, code}
    FIRST_CHUNK_SECONDS = "cosyvoice_gateway_first_chunk_seconds"
    REQUEST_SECONDS = "cosyvoice_gateway_request_seconds"          # {rpc}
    STAGE_RETRIES = "cosyvoice_gateway_stage_retries_total"        # {stage}
    STAGE_CALLS = "cosyvoice_gateway_stage_calls_total"            # {stage}, counted when sent
    PROMPT_CACHE = "cosyvoice_gateway_prompt_cache_total"          # {result}
    SPK2INFO_LOOKUPS = "cosyvoice_spk2info_lookups_total"          # {result}
    SPK2INFO_ERRORS = "cosyvoice_spk2info_errors_total"            # {op}


class LLMMetric:
    """The llm model's Triton metrics (its tritonserver's metrics port)."""
    ACTIVE_REQUESTS = "llm_active_requests"                        # gauge: enqueued or decoding
    GENERATED_TOKENS = "llm_generated_tokens"
    REPETITION_STOPS = "llm_repetition_stops"
    CAPACITY_BATCH_SLOTS = "llm_capacity_batch_slots"
    CAPACITY_MAX_SEQ_LEN = "llm_capacity_max_seq_len"
    KV_CACHE_BYTES = "llm_kv_cache_bytes"


class Token2WavMetric:
    """The token2wav model's Triton metrics; the first three by `kind` (sequence.CHUNK_KINDS)."""
    CHUNKS = "token2wav_chunks"
    CHUNK_WAIT_MS = "token2wav_chunk_wait_ms"
    CHUNK_COMPUTE_MS = "token2wav_chunk_compute_ms"
    FLOW_FRAMES_COMPUTED = "token2wav_flow_frames_computed"
    FLOW_FRAMES_REUSED = "token2wav_flow_frames_reused"
    STREAM_STATE_BYTES = "token2wav_stream_state_bytes"
