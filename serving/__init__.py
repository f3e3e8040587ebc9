"""A model server that answers TensorFlow Serving's REST and gRPC APIs.

Installed as `keras_hps.serving`. Modules (each imported only when used):

- `model_config`: `models.config` (ModelServerConfig text), version policies, labels
- `manager`: loading, polling, availability-preserving switchover, version status
- `warmup`: replay of a version's `tf_serving_warmup_requests` before it serves
- `server`: `ModelServer`, one process serving gRPC and REST over one manager
- `spin_wait`: the SCHED_IDLE spin-wait on the request threads' CPU (`--spin_wait_ms`)
- `rest`, `rest_json`: the REST routes and TF Serving's JSON (row, columnar, b64, errors)
- `grpc_service`, `tensors`: PredictionService / ModelService and TensorProto conversion
- `batching`: server-side batching with TF Serving's BatchingParameters file format
- `metrics`: Prometheus text (request counts, latency histogram, per-tier table counters)
- `status`: status codes and TF Serving's code -> HTTP mapping
- `client`: `GrpcClient`, `RestClient` (predict from NumPy inputs)
- `cli`, `bench`, `demo`: `keras-hps serve`, `keras-hps bench`, `keras-hps demo`
"""
