"""Records and their renderers. This package imports nothing of the model,
variants or bench: only the Record schema."""
