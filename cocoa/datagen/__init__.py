"""cocoa.datagen."""
