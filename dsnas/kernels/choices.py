"""The engine's per-layer choices by name, without torch: the search space, the model family and the predictor
read them."""

PRECISIONS = ("fp32", "bf16", "fp16", "int8", "fp8")
SPARSITIES = ("dense", "2:4", "auto")  # "auto": the Hessian trace decides whether this layer is sparsified
