"""cocoa.datagen: teacher synthesis. Teacher backends (vLLM, OpenAI-compatible servers, transformers,
the programmatic scenes teacher), output schemas, and the resumable, kill-safe synth driver."""
