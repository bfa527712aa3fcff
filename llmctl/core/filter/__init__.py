"""Quality filtering of JSONL corpora with published heuristics (Gopher, C4, FineWeb)."""

from llmctl.core.filter.apply import FilterStats, filter_records, load_thresholds, parse_rules, rule_params
from llmctl.core.filter.rules import RULES, Rule

__all__ = ["RULES", "FilterStats", "Rule", "filter_records", "load_thresholds", "parse_rules", "rule_params"]
