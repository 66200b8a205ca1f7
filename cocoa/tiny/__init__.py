"""cocoa.tiny: the embedded backbone. A ~3M-parameter Qwen2-VL built offline (local tokenizer, stock
processor), its contrastive vision alignment and its generative pre-training on scenes, cached by
settings; the default model of the demo and the tests."""
