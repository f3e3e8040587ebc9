"""A model server that answers TensorFlow Serving's REST and gRPC APIs.

Installed as `keras_hps.serving`. Modules (each imported only when used):

- `model_config`: `models.config` (ModelServerConfig text), version policies, labels
- `manager`: loading, polling, availability-preserving switchover, version status
- `warmup`: replay of a version's `tf_serving_warmup_requests` before it serves
- `server`: `ModelServer`, one process serving gRPC and REST over one manager
- `spin_wait`: the SCHED_IDLE spin-wait on the request threads' CPU (`--spin_wait_ms`)
- `rest`, `rest_json`: the REST routes and TF Serving's JSON (row, columnar, b64, classify,
  regress, errors); `lazy_json`: JSON parsing in bounded memory (large arrays read in chunks)
- `http_server`: the REST transport on aiohttp (keep-alive, chunked and gzip bodies, limits,
  timeouts, a connection cap, the REST thread pool)
- `grpc_service`, `tensors`: PredictionService / ModelService and TensorProto conversion
- `batching`: server-side batching with TF Serving's BatchingParameters file format
- `metrics`: Prometheus metrics per server (TF Serving's request count and latency, per-tier
  table counters) and `--monitoring_config_file`
- `status`: status codes and TF Serving's code -> HTTP mapping
- `client`: `GrpcClient`, `RestClient` (predict from NumPy inputs)
- `cli`, `bench`, `demo`: `keras-hps serve`, `keras-hps bench`, `keras-hps demo`
"""
