"""Generated gRPC stubs; regenerate with `python -m protos.build`."""
