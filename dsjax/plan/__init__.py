"""The planner (`python -m dsjax.plan`): compiles the real train or decode step for abstract TPU
slices and reports per-chip memory, collectives and a roofline step time. `planner` is the code;
`tpu_specs` the chips' published figures; `hlo_stats` reads XLA's buffer assignment and HLO."""
