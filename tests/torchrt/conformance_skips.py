"""Reviewed conformance cases whose ops are all supported but which are not expected to pass.

case name -> the reason (one line, checked by a reviewer). Everything else that the runtime accepts
must match ONNX's expected outputs.
"""

_FP16_ATTENTION = (
    "float16 end to end: numpy's float16 matmul/softmax in the reference rounds intermediate results "
    "differently from torch's CPU half kernels (which accumulate in float32); 2 of 192 outputs differ by "
    "2 fp16 ulps (4.9e-4 at 0.47), just over rtol=1e-3. All float32 attention cases pass."
)

SKIPS: dict[str, str] = {
    "node/test_attention_4d_causal_fp16": _FP16_ATTENTION,
    "node/test_attention_4d_causal_fp16_expanded": _FP16_ATTENTION,
}
