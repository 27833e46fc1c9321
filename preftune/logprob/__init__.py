"""The pieces of the log-prob engine (preftune/logps.py runs them): the layout planner
(plan.py), the architecture facts it reads (arch.py), the shared-prefix and window attention
(prefix.py), and the two fast paths that write a weight's gradient themselves, each beside the
plain computation it is tested against (embedding.py, head.py)."""
