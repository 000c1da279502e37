"""The decode worker: receives KV from prefill workers, then decodes with continuous batching."""
