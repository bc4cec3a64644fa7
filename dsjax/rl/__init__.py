"""Reinforcement learning: GRPO (objective and step), rule-based rewards, and its run loop."""
