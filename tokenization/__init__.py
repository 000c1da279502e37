"""Text <-> tokens without torch: the incremental detokenizer (shared by the engine and the gateway)."""
