"""Tokenizer stage: Whisper log-mel features and the S3 v2 speech tokenizer (onnxruntime / s3tokenizer port)."""
from cosyvoice_tokenizer.tokenizer import SPEECH_TOKENIZER_FILE, SpeechTokenizer, code_length

__all__ = ["SPEECH_TOKENIZER_FILE", "SpeechTokenizer", "code_length"]
