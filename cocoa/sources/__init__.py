"""cocoa.sources: source datasets as records. MMEB-train / MMEB-eval readers and writers (published
parquet + image-zip layouts) and the procedural scenes benchmark (the embedded default)."""
