"""Speaker stage: Kaldi fbank + CAM++ x-vector (onnxruntime / onnx2torch), 24 kHz prompt mel."""
from cosyvoice_speaker.encoder import CAMPPLUS_FILE, SpeakerEncoder

__all__ = ["CAMPPLUS_FILE", "SpeakerEncoder"]
