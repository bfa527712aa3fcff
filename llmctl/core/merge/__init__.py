"""Model merging out of core: mergekit-compatible recipes, a registry of methods, streamed safetensors.

from llmctl.core.merge import load_recipe, run_merge
run_merge(load_recipe("merge.yaml"), "out")
"""

from llmctl.core.merge.config import MergeRecipe, is_recipe, load_recipe, parse_recipe, recipe_from_flags
from llmctl.core.merge.methods import REGISTRY, get_method
from llmctl.core.merge.run import MergeOptions, run_merge

__all__ = [
    "REGISTRY",
    "MergeOptions",
    "MergeRecipe",
    "get_method",
    "is_recipe",
    "load_recipe",
    "parse_recipe",
    "recipe_from_flags",
    "run_merge",
]
