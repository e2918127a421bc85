"""Conformance kit for playattention components (see toolkit.testing.conformance)."""
