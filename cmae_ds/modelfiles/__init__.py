"""Model files: formats and converters, classifier files, safe loading."""
