"""Code generation: exact reference math and the `attnopt::attention` custom op (registered on import)."""
from attnopt.codegen import ops  # noqa: F401  registers torch.ops.attnopt.attention
from attnopt.codegen import gna_op  # noqa: F401  registers torch.ops.attnopt.gna_attention
from attnopt.codegen.ops import attention_op
from attnopt.codegen.reference import reference_attention

__all__ = ["attention_op", "gna_op", "reference_attention", "ops"]
