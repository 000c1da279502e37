"""The public `splitserve.v1.Generation` service: protobuf in and out, the pipeline does the work."""

from __future__ import annotations

import grpc
import structlog

from gateway.errors import GatewayError
from gateway.output import Delta
from gateway.pipeline import Emit, Pipeline, Result
from protos.splitserve.v1 import generation_pb2, generation_pb2_grpc

log = structlog.get_logger("gateway")


class GenerationServicer(generation_pb2_grpc.GenerationServicer):
    """Maps GatewayError to its status; an unexpected error becomes INTERNAL (and is logged)."""

    def __init__(self, pipeline: Pipeline) -> None:
        self._pipeline = pipeline

    async def Generate(  # noqa: N802 (gRPC method name)
        self, request: generation_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> generation_pb2.GenerateResponse:
        result = await self._serve(request, context, _discard)
        return generation_pb2.GenerateResponse(
            request_id=result.request_id, text=result.text, token_ids=result.token_ids,
            finish_reason=result.finish_reason, usage=result.usage, timings=result.timings,
            prefill_worker=result.prefill_worker, decode_worker=result.decode_worker,
        )

    async def GenerateStream(  # noqa: N802 (gRPC method name)
        self, request: generation_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> None:
        async def emit(delta: Delta) -> None:
            await context.write(generation_pb2.GenerateStreamResponse(
                request_id=delta.request_id, token_ids=delta.token_ids, text=delta.text))

        result = await self._serve(request, context, emit)
        await context.write(generation_pb2.GenerateStreamResponse(
            request_id=result.request_id, text=result.tail_text, finish_reason=result.finish_reason,
            usage=result.usage, timings=result.timings, prefill_worker=result.prefill_worker,
            decode_worker=result.decode_worker,
        ))

    async def _serve(self, request: generation_pb2.GenerateRequest, context: grpc.aio.ServicerContext,
                     emit: Emit) -> Result:
        try:
            return await self._pipeline.run(request, emit, context.time_remaining())
        except GatewayError as e:
            await context.abort(e.code, e.message)
            raise AssertionError("unreachable: abort raises") from None
        except Exception as e:
            log.exception("request failed")
            await context.abort(grpc.StatusCode.INTERNAL, f"internal gateway error: {type(e).__name__}: {e}")
            raise AssertionError("unreachable: abort raises") from None


async def _discard(delta: Delta) -> None:
    return None
