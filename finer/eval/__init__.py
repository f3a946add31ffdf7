"""Evaluation: what to ask (tasks), the engine that asks it, scoring rules, reports, probes and the lmms-eval
export."""
