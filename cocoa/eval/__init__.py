"""cocoa.eval."""
