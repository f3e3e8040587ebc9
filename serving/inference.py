"""Classify, Regress and MultiInference on a loaded version, with TF Serving's semantics.

Each takes the request proto of `tensorflow_serving.apis` and returns the response proto,
as `classifier.cc`, `regressor.cc` and `multi_inference.cc` of TF Serving do: the
signature is checked for shape (one `inputs` tensor; `classes` and/or `scores`, or
`outputs`) and, with `--enable_signature_method_name_check`, for its method name; the
`tf.Example`s of the request (an `example_list`, or an `example_list_with_context` whose
context is prepended to every example's serialized bytes) are fed as one string tensor;
the outputs are checked and turned into results. Errors carry TF Serving's wording.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .status import ServingError, invalid_argument

DEFAULT_SIGNATURE = "serving_default"
CLASSIFY_METHOD = "tensorflow/serving/classify"
REGRESS_METHOD = "tensorflow/serving/regress"
PREDICT_METHOD = "tensorflow/serving/predict"
CLASSIFY_INPUTS, CLASSIFY_CLASSES, CLASSIFY_SCORES = "inputs", "classes", "scores"
REGRESS_INPUTS, REGRESS_OUTPUTS = "inputs", "outputs"


def serialized_examples(input_proto: Any) -> np.ndarray:
    """The request's examples as a string array (context bytes first, when given)."""
    kind = input_proto.WhichOneof("kind")
    if kind == "example_list":
        values = [e.SerializeToString() for e in input_proto.example_list.examples]
    elif kind == "example_list_with_context":
        both = input_proto.example_list_with_context
        context = both.context.SerializeToString()
        values = [context + e.SerializeToString() for e in both.examples]
    else:
        values = []
    if not values:
        raise invalid_argument("Input is empty.")
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def model_spec(name: str, signature_name: str | None, version: int | None) -> Any:
    """TF Serving's MakeModelSpec: an empty signature name reads as the default one."""
    from tensorflow_serving.apis import model_pb2

    spec = model_pb2.ModelSpec(name=name)
    if signature_name is not None:
        spec.signature_name = signature_name or DEFAULT_SIGNATURE
    if version is not None:
        spec.version.value = version
    return spec


def _debug(signature: Any) -> str:
    from google.protobuf import text_format

    return text_format.MessageToString(signature)


def _shape(array: np.ndarray) -> str:
    return "[" + ",".join(map(str, array.shape)) + "]"


def _dtype_name(array: np.ndarray) -> str:
    from tensorflow.core.framework import types_pb2

    from .tensors import numpy_to_enum

    return types_pb2.DataType.Name(numpy_to_enum(array.dtype))


def _signature(servable: Any, spec: Any, method: str, check_method: bool) -> Any:
    """The signature a Classify or Regress request names (TF Serving's Get...SignatureDef)."""
    name = spec.signature_name or DEFAULT_SIGNATURE
    if name not in servable.signatures:
        raise invalid_argument(f"No signature was found with the name: {name}")
    signature = servable.signature_def(name)
    _check_method(signature, method, check_method)
    return signature


def _check_method(signature: Any, method: str, check_method: bool) -> None:
    """With --enable_signature_method_name_check, the signature must be of `method`."""
    if check_method and signature.method_name != method:
        kind = "classification" if method == CLASSIFY_METHOD else "regression"
        raise invalid_argument(
            f"Expected {kind} signature method_name to be {method}. "
            f"Was: {signature.method_name}"
        )


def _classification_tensors(signature: Any, check_method: bool) -> tuple[str, list[str]]:
    """(input tensor, output tensors) of a classification signature (PreProcessClassification)."""
    _check_method(signature, CLASSIFY_METHOD, check_method)
    if len(signature.inputs) != 1:
        raise invalid_argument("Expected one input Tensor.")
    if len(signature.outputs) not in (1, 2):
        raise invalid_argument(
            f"Expected one or two output Tensors, found {len(signature.outputs)}"
        )
    if CLASSIFY_INPUTS not in signature.inputs:
        raise invalid_argument(
            f"No classification inputs found in SignatureDef: {_debug(signature)}"
        )
    outputs = [signature.outputs[k].name for k in (CLASSIFY_CLASSES, CLASSIFY_SCORES)
               if k in signature.outputs]
    if not outputs:
        raise invalid_argument(
            "Expected classification signature outputs to contain at least one of "
            f'"{CLASSIFY_CLASSES}" or "{CLASSIFY_SCORES}". Signature was: {_debug(signature)}'
        )
    return signature.inputs[CLASSIFY_INPUTS].name, outputs


def _regression_tensors(signature: Any, check_method: bool) -> tuple[str, list[str]]:
    """(input tensor, output tensors) of a regression signature (PreProcessRegression)."""
    _check_method(signature, REGRESS_METHOD, check_method)
    if len(signature.inputs) != 1:
        raise invalid_argument("Expected one input Tensor.")
    if len(signature.outputs) != 1:
        raise invalid_argument("Expected one output Tensor.")
    if REGRESS_INPUTS not in signature.inputs:
        raise invalid_argument(f"No regression inputs found in SignatureDef: {_debug(signature)}")
    if REGRESS_OUTPUTS not in signature.outputs:
        raise invalid_argument(f"No regression outputs found in SignatureDef: {_debug(signature)}")
    return signature.inputs[REGRESS_INPUTS].name, [signature.outputs[REGRESS_OUTPUTS].name]


def _classification_result(signature: Any, examples: int, fetched: dict[str, np.ndarray],
                           result: Any) -> None:
    """Checks the outputs and fills a ClassificationResult (PostProcessClassificationResult)."""
    found = {k: fetched[signature.outputs[k].name]
             for k in (CLASSIFY_CLASSES, CLASSIFY_SCORES) if k in signature.outputs}
    classes, scores = found.get(CLASSIFY_CLASSES), found.get(CLASSIFY_SCORES)
    for what, tensor, want in (("classes", classes, "DT_STRING"), ("scores", scores, "DT_FLOAT")):
        if tensor is None:
            continue
        if tensor.ndim != 2:
            raise invalid_argument(
                f"Expected Tensor shape: [batch_size num_classes] but got {_shape(tensor)}"
            )
        if _dtype_name(tensor) != want:
            raise invalid_argument(f"Expected {what} Tensor of {want}. Got: {_dtype_name(tensor)}")
        if tensor.shape[0] != examples:
            raise invalid_argument(
                f"Expected {what} output batch size of {examples}. Got: {tensor.shape[0]}"
            )
    if classes is not None and scores is not None and classes.shape[1] != scores.shape[1]:
        raise invalid_argument(
            "Tensors class and score should match in dim_size(1). Got "
            f"{classes.shape[1]} vs. {scores.shape[1]}"
        )
    num_classes = (classes if classes is not None else scores).shape[1]
    for i in range(examples):
        row = result.classifications.add()
        for c in range(num_classes):
            cl = row.classes.add()
            if classes is not None:
                label = classes[i, c]
                cl.label = label.decode("utf-8", "replace") if isinstance(label, bytes) else label
            if scores is not None:
                cl.score = float(scores[i, c])


def _regression_result(signature: Any, examples: int, fetched: dict[str, np.ndarray],
                       result: Any) -> None:
    """Checks the output and fills a RegressionResult (PostProcessRegressionResult)."""
    out = fetched[signature.outputs[REGRESS_OUTPUTS].name]
    if not (out.ndim == 1 or (out.ndim == 2 and out.shape[1] == 1)):
        raise invalid_argument(
            "Expected output Tensor shape to be either [batch_size] or [batch_size, 1] but "
            f"got {_shape(out)}"
        )
    if examples != out.shape[0]:
        raise invalid_argument(
            f"Input batch size did not match output batch size: {examples} vs. {out.shape[0]}"
        )
    if _dtype_name(out) != "DT_FLOAT":
        raise invalid_argument(f"Expected output Tensor of DT_FLOAT.  Got: {_dtype_name(out)}")
    for value in out.reshape(-1):
        result.regressions.add().value = float(value)


def _run(servable: Any, input_name: str, output_names: list[str], input_proto: Any
         ) -> tuple[int, dict[str, np.ndarray]]:
    """One session run over the request's examples: (number of examples, fetched tensors)."""
    examples = serialized_examples(input_proto)
    names = list(dict.fromkeys(output_names))
    values = servable.run_tensors({input_name: examples}, names)
    return len(examples), dict(zip(names, values, strict=True))


def _answer(servable: Any, request: Any, version: int | None, check_method: bool,
            method: str, response: Any) -> Any:
    """Classify or Regress: signature, one run over the examples, checked result."""
    tensors, post, _ = _TASKS[method]
    signature = _signature(servable, request.model_spec, method, check_method)
    input_name, outputs = tensors(signature, check_method)
    response.model_spec.CopyFrom(
        model_spec(request.model_spec.name, request.model_spec.signature_name, version))
    examples, fetched = _run(servable, input_name, outputs, request.input)
    post(signature, examples, fetched, response.result)
    return response


def classify(servable: Any, request: Any, version: int | None, check_method: bool = False
             ) -> Any:
    """ClassificationResponse of `request` on a loaded version."""
    from tensorflow_serving.apis import classification_pb2

    return _answer(servable, request, version, check_method, CLASSIFY_METHOD,
                   classification_pb2.ClassificationResponse())


def regress(servable: Any, request: Any, version: int | None, check_method: bool = False
            ) -> Any:
    """RegressionResponse of `request` on a loaded version."""
    from tensorflow_serving.apis import regression_pb2

    return _answer(servable, request, version, check_method, REGRESS_METHOD,
                   regression_pb2.RegressionResponse())


_TASKS = {
    CLASSIFY_METHOD: (_classification_tensors, _classification_result, "classification_result"),
    REGRESS_METHOD: (_regression_tensors, _regression_result, "regression_result"),
}


def multi_inference(servable: Any, request: Any, version: int | None,
                    check_method: bool = False) -> Any:
    """MultiInferenceResponse: every task's signature over one run of the examples."""
    from tensorflow_serving.apis import inference_pb2

    model_name, input_name = "", ""
    seen: set[str] = set()
    outputs: set[str] = set()
    plan = []
    for task in request.tasks:
        if not task.model_spec.name:
            raise invalid_argument("Found ModelSpec with an empty model name.")
        if model_name and model_name != task.model_spec.name:
            raise invalid_argument(
                "All ModelSpecs in a MultiInferenceRequest must access the same model name."
            )
        model_name = task.model_spec.name
        name = task.model_spec.signature_name or DEFAULT_SIGNATURE
        if name in seen:
            raise invalid_argument(f"Duplicate evaluation of signature: {name}")
        seen.add(name)
        if name not in servable.signatures:
            raise invalid_argument(f"Requested signature not found in model graph: {name}")
        if task.method_name not in _TASKS:
            raise ServingError(
                "UNIMPLEMENTED", f"Unsupported signature method_name: {task.method_name}"
            )
        signature = servable.signature_def(name)
        tensors, post, field = _TASKS[task.method_name]
        task_input, task_outputs = tensors(signature, check_method)
        if input_name and input_name != task_input:
            raise invalid_argument("Input tensor must be the same for all Signatures.")
        input_name = task_input
        outputs.update(task_outputs)
        plan.append((task, signature, post, field))
    response = inference_pb2.MultiInferenceResponse()
    examples, fetched = _run(servable, input_name, sorted(outputs), request.input)
    for task, signature, post, field in plan:
        result = response.results.add()
        result.model_spec.CopyFrom(
            model_spec(task.model_spec.name, task.model_spec.signature_name, version))
        post(signature, examples, fetched, getattr(result, field))
    return response
