"""cocoa.datagen.sources."""
