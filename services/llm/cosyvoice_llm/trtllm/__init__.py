"""The TensorRT-LLM path of the llm stage (spec 8.5): llm.pt -> Hugging Face Qwen2 checkpoint with the flat speech
vocabulary (`convert`), the lm-head bias carried into TensorRT-LLM (`headbias`, `build`), and the Triton
`tensorrtllm` model served as `llm` (`repo`). Only `build` needs tensorrt_llm; everything else runs on CPU.
"""
