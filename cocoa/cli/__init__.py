"""cocoa.cli."""
