"""moeshard: a torch.compile backend for Mixture-of-Experts inference.

    torch.compile(model, backend="moeshard", options={"dump_dir": "moeshard_dump"})

Importing this package (Dynamo does it through the `torch_dynamo_backends` entry point)
registers the `moeshard::` ops and installs the capture shims for HF experts.
"""

from moeshard_compile import capture
from moeshard_compile.kernels import ops  # noqa: F401  (registers torch.ops.moeshard)
from moeshard_compile import exchange  # noqa: F401  (registers torch.ops.moeshard.all_to_all_rows)
from moeshard_compile.backend import make_backend, moeshard_backend
from moeshard_compile.distributed import CollectiveFailedError, RankMismatchError
from moeshard_compile.explain import explain
from moeshard_compile.options import OptionError, Options
from moeshard_compile.report import Report
from moeshard_compile.weights import ReleasedError

capture.install()

__all__ = ["moeshard_backend", "make_backend", "explain", "Options", "OptionError", "Report", "RankMismatchError",
           "CollectiveFailedError", "ReleasedError"]
