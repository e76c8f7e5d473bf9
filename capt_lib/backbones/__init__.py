"""Frozen CLIP backbones: open_clip loading, the offline MiniCLIP, text path, feature caches."""
