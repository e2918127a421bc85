"""pytest plugin (entry point pytest11) that exposes the playattention conformance fixtures."""
