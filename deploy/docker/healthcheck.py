"""Container health check: the gRPC health protocol against the local server (exit 0 = SERVING)."""

import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

port = os.environ.get("PARLEY_PORT", "50051")
try:
    stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
    status = stub.Check(health_pb2.HealthCheckRequest(service="parley.v1.Translator"), timeout=2).status
except grpc.RpcError as error:
    sys.exit(f"unhealthy: {error.code().name}")
sys.exit(0 if status == health_pb2.HealthCheckResponse.SERVING else f"unhealthy: {status}")
