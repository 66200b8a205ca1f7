"""Prompt templates (``*.j2``) for teacher synthesis and their sandboxed loader."""

from .loader import (
    BUILTIN_DIR,
    KINDS,
    PromptError,
    PromptLibrary,
    RenderedPrompt,
    Template,
    clean_text,
    image_kind,
)

__all__ = [
    "BUILTIN_DIR", "KINDS", "PromptError", "PromptLibrary", "RenderedPrompt", "Template", "clean_text", "image_kind",
]
