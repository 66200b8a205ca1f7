"""cocoa.cli: the thin click commands (`cocoa-data`, `cocoa-train`, `cocoa-eval`). They parse flags
into one pydantic config per command, call the library, and print one-line errors."""
