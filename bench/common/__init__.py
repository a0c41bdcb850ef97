"""What every benchmark shares, so that each figure is timed, floored and recorded the same way:
timing.py (medians of calls), floor.py (FLOPs over the matmul peak, the peak tables), links.py
(what a collective costs, fitted to 4 H100s), schedule.py (the source-rank schedule of N ranks on
two streams each), environment.py (device and versions, the JSON written), cli.py (dtypes,
--smoke, comma lists, tables), accuracy.py (the error against a reference), ranks.py (local gloo
ranks) and kernel_timeline.py (communication under computation, from the GPU's kernel timeline)."""
