"""cocoa.datagen.teachers."""
