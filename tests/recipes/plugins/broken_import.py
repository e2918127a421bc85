"""Test plugin that cannot be imported."""
raise ImportError("needs flash_attn, which is not installed")
