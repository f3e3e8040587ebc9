"""A model server that answers TensorFlow Serving's REST and gRPC APIs.

Installed as `keras_hps.serving`. The core knows no frontend; the frontends take a core;
`server` puts them together. Modules (each imported only when used):

- core: `model_config` (`models.config`, version policies, labels), `manager` (loading,
  polling, retries, availability-preserving switchover, version status), `tables` (the
  reference-counted parameter servers of the loaded versions), `warmup` (replay of a
  version's `tf_serving_warmup_requests`), `batching` (TF Serving's BatchingParameters),
  `inference` (Classify, Regress, MultiInference), `api` (status and metadata answers,
  signature checks), `status` (codes, HTTP mapping), `tensors` (TensorProto conversion),
  `protos` (message classes no installed package ships), `spin_wait`,
  `metrics` (per server, on prometheus_client), and
  `core` itself (`ServingCore`, `ServerOptions`)
- frontends: `grpc_service` (PredictionService, ModelService, health), `rest` + `rest_json`
  (REST routes, TF Serving's JSON: row, columnar, b64, classify, regress, errors), `lazy_json`
  (JSON parsing in bounded memory), `http_server` (the REST transport on aiohttp: keep-alive,
  chunked and gzip bodies, limits, timeouts, a connection cap, the REST thread pool)
- composition: `server` (`ModelServer`: a core with both frontends), `cli` (`keras-hps
  serve`, tensorflow_model_server's flags)
- tools: `client` (`GrpcClient`, `RestClient`), `bench` (`keras-hps bench`), `demo`
"""
