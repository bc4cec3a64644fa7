"""`python -m dsjax.plan ...`: see dsjax/plan/planner.py."""

from dsjax.plan.planner import run

run()
