"""Planner: profiles, cost model, EdgeShard DP, E2LLM GA, baselines, Plan. Pure: no I/O, no clock, rng injected."""
