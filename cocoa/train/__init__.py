"""cocoa.train."""
