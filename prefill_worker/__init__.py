"""The prefill worker: computes prompt chunks and hands their KV to a decode worker."""
