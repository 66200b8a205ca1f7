"""cocoa.prompts."""
