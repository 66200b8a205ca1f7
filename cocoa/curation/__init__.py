"""cocoa.curation."""
