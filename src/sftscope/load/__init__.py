"""Loading: architectures (where things are), models and pairs, datasets."""
